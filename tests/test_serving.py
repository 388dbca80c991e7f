"""Serving (docs/serving.md): raw values -> the same indices as the ETL, the exported artifact
scores like the training model, bad rows are rejected one by one, Ray batch scoring.

One data set for the module: generated Tenrec-format files plus a planted user whose lines
hold missing, unseen and oddly written values (spaces, `\\N`, `1e2`, `0x10p0`, `NaN`, `1_0`,
non-ASCII digits, ...), built by the real ETL (local Spark); a MEM and a TEM trained a few
steps in-process, saved as train/run.py lays out a RUN_DIR, and exported by train/export.py.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

# Before anything imports Ray: keep every node on the loopback address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import torch
from deltalake import DeltaTable, write_deltalake

from etl.build_samples import build_samples
from jobs.generate_tenrec import COLUMNS, FILE_NAMES, generate
from mkt.contract import ACTIVITY_COUNTS, activity_feature
from mkt.encoding import (
    OOV,
    EncodingContractError,
    FeatureEncoder,
    check_reserved_indices,
    clean_text,
    parse_integer_id,
    parse_number,
)
from mkt.features import to_tensors
from mkt.layers.embedding import EmbeddingBank
from mkt.models.mem import MEM
from mkt.models.tem import TEM
from mkt.schema import FeatureSchema
from mkt.serving import RECENT_LIKES, Artifact, ArtifactError, read_artifact_files
from train.checkpoints import TrainState, save_checkpoint
from train.config import dump, load_run_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TENREC_CONFIG = REPO / "conf" / "data" / "tenrec.yaml"
PLANTED_USER = 10**6 + 7
PLANTED_ARTICLE_LINES = 220  # 158 train, 18 valid, 44 test
# Written into the planted user's valid / test lines only, so bucket boundaries (train
# quantiles) stay those of ordinary numbers.
ODD_NUMBERS = [
    *[" 7 ", "\t7", "1e2", "1E+2", "1.", ".5", "+.5", "-.5e1", "1d", "2.5F", "1e", "e1", "."],
    *["0x10", "0x10p0", "0X1.8P1", "0x.8p1", "NaN", "nan", "+nan", "NAN", "-Infinity"],
    *["infinity", "inf", "-inf", "+inf", "INF", "1_0", "١٢", "１", "1e400", "-1e400"],
    *["4.9e-325", "1.7976931348623159e308", "00012", "1.2.3", "abc", "", "\\N", "1 2"],
    *["\u00a07", "٣", "1e-2f", "5l", "NaNd", "Infinityd", "-0", "99999999"],
]
ODD_CATEGORIES = ["\\N", "", " 3 ", "03", "3.0", "\t3", " ", "2"]
# Integer ids as the raw files may write them: the ETL keys each by its value.
ODD_IDS = ["{} ", "+{}", "00{}", "\t{}", "+00{}", "{}"]
BUCKETIZED = ["item_score1", "item_score2", "item_score3", "exposure_count", "click_count"]
BUCKETIZED += ["like_count", "comment_count"]


# --------------------------------------------------------------------------------------------
# Data: generated files + a planted user, the ETL's output, a trained and exported model.
# --------------------------------------------------------------------------------------------


def _line(entity: str, **values: object) -> str:
    return ",".join(str(values.get(c, 0)) for c in COLUMNS[entity])


def _planted_lines() -> dict[str, list[str]]:
    article = []
    for i in range(PLANTED_ARTICLE_LINES):
        held_out = i >= 158
        numbers = {
            name: ODD_NUMBERS[(i + k) % len(ODD_NUMBERS)] if held_out else (i * (k + 3)) % 97
            for k, name in enumerate(BUCKETIZED)
        }
        article.append(
            _line(
                "article",
                user_id=f"0{PLANTED_USER}" if i % 7 == 0 else PLANTED_USER,
                item_id=ODD_IDS[i % len(ODD_IDS)].format(i % 15) if i % 4 else 9_999_000 + i,
                like=int(i % 3 == 0),
                click=1,
                gender=ODD_CATEGORIES[i % len(ODD_CATEGORIES)],
                age=" 4" if i % 2 else "\\N",
                # Values first seen after the train lines are out of vocabulary.
                category_first=f"zz{i}" if held_out and i % 3 == 0 else ODD_CATEGORIES[i % 8],
                category_second=ODD_CATEGORIES[(i + 2) % len(ODD_CATEGORIES)],
                **numbers,
            )
        )
    video = [
        _line(
            "video",
            user_id=f"+{PLANTED_USER}" if i % 9 == 0 else PLANTED_USER,
            item_id=ODD_IDS[i % len(ODD_IDS)].format(i % 11) if i % 5 else 8_888_000 + i,
            like=int(i % 2 == 0),
            click=1,
            video_category=f"zz{i}" if i >= 50 else ODD_CATEGORIES[i % len(ODD_CATEGORIES)],
            gender=1,
            age=4,
        )
        for i in range(60)
    ]
    return {"article": article, "video": video}


@dataclass
class Built:
    out: Path
    schema: FeatureSchema
    samples: pd.DataFrame
    vocab: pa.Table
    lines: dict[str, dict[int, dict[str, str]]]  # entity -> line_no -> raw column -> text


@pytest.fixture(scope="module")
def built(spark, tmp_path_factory: pytest.TempPathFactory) -> Built:
    raw = tmp_path_factory.mktemp("serving_raw")
    generate(raw, num_users=200, seed=5)
    for entity, extra in _planted_lines().items():
        with (raw / FILE_NAMES[entity]).open("a") as fh:
            fh.write("\n".join(extra) + "\n")
    out = tmp_path_factory.mktemp("serving_out") / "tenrec"
    build_samples(spark, TENREC_CONFIG, raw, out, activity=True)
    lines: dict[str, dict[int, dict[str, str]]] = {}
    for entity, file in FILE_NAMES.items():
        header, *data = (raw / file).read_text().rstrip("\n").split("\n")
        names = header.split(",")
        lines[entity] = {
            n: dict(zip(names, text.split(","), strict=True)) for n, text in enumerate(data, 1)
        }
    samples = DeltaTable(str(out / "samples")).to_pyarrow_table().to_pandas()
    return Built(
        out=out,
        schema=FeatureSchema.load(out),
        samples=samples.sort_values(["entity", "line_no"]).reset_index(drop=True),
        vocab=DeltaTable(str(out / "vocab")).to_pyarrow_table(),
        lines=lines,
    )


def _batches(schema: FeatureSchema, rows: pd.DataFrame, size: int, seed: int):
    order = np.random.default_rng(seed).permutation(len(rows))
    for start in range(0, len(order) - size + 1, size):
        part = rows.iloc[order[start : start + size]]
        yield to_tensors(schema, {c: part[c].to_numpy() for c in part.columns})


def _fit(model, schema: FeatureSchema, rows: pd.DataFrame, epochs: int = 2) -> None:
    """A few Adam steps: enough to move every weight off its initial value."""
    torch.manual_seed(0)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.01)
    model.train()
    for epoch in range(epochs):
        for batch in _batches(schema, rows, 256, seed=epoch):
            loss = model.loss(batch, model(batch))["loss"]
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()


@dataclass
class Trained:
    mem: MEM
    tem: TEM
    run_dir: Path
    artifact_dir: Path
    artifact: Artifact


def write_run_dir(
    run_dir: Path, samples_dir: Path, models: dict[str, tuple[str, torch.nn.Module]]
) -> None:
    """What export reads from a RUN_DIR of train/run.py: config.yaml (the runner's own
    loader and writer), metrics.json's stages (name: (model, trained module)), and
    checkpoints (the runner's writer)."""
    config = load_run_config(None, ["model=mkt"])
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        dump({"invocation": {"samples": str(samples_dir), "oracle": None}, **config})
    )
    stages = []
    for name, (model_name, model) in models.items():
        checkpoint = run_dir / "checkpoints" / name / "checkpoint_000001"
        checkpoint.mkdir(parents=True)
        # A MEM under a TEM is frozen; the optimizer is only there to be saved.
        optimizer = torch.optim.Adam(model.parameters())
        save_checkpoint(checkpoint, model, optimizer, TrainState(epochs_done=1))
        stages.append(
            {"name": name, "model": model_name, "params": {}, "best_checkpoint": str(checkpoint)}
        )
    metrics = {"model": "mkt", "stages": stages, "test": {"model": {"rows": 0, "auc": 0.5}}}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))


@pytest.fixture(scope="module")
def trained(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Trained:
    from train.export import main as export_main

    schema, samples = built.schema, built.samples
    train_rows = samples[samples["split"] == "train"]
    torch.manual_seed(1)
    mem = MEM(schema)
    _fit(mem, schema, train_rows)
    target_rows = train_rows[train_rows["entity"] == schema.target_entity]
    alone = TEM(schema)
    _fit(alone, schema, target_rows)
    tem = TEM(schema, pretrained=(mem, alone))
    _fit(tem, schema, target_rows)
    run_dir = tmp_path_factory.mktemp("serving_run") / "run-7"
    models = {"mem": ("mem", mem), "tem_alone": ("tem", alone), "tem": ("tem", tem)}
    write_run_dir(run_dir, built.out, models)
    artifact_dir = run_dir.parent / "artifact"
    assert export_main(["--run", str(run_dir), "--output", str(artifact_dir)]) == 0
    return Trained(mem, tem, run_dir, artifact_dir, Artifact.load(artifact_dir))


def target_test_rows(built: Built) -> pd.DataFrame:
    s = built.samples
    rows = s[(s["entity"] == built.schema.target_entity) & (s["split"] == "test")]
    return rows.reset_index(drop=True)


def raw_activity(samples: pd.DataFrame, schema: FeatureSchema) -> dict[str, np.ndarray]:
    """The raw counts behind each row's activity features, recomputed from the samples'
    entity, split, line and label (frozen mode, docs/etl.md): of the row's own entity, its
    user's earlier train rows (a train row), the train block (valid) or train + valid
    (test); of the other entity, train + valid for a test row, else the train block."""
    s = samples.sort_values(["entity", "user_key", "line_no"])
    earlier = s.groupby(["entity", "user_key"])
    before = {"rows": earlier.cumcount(), "likes": earlier["label"].cumsum() - s["label"]}
    split, entity = samples["split"].to_numpy(), samples["entity"].to_numpy()
    other_entity = np.where(
        entity == schema.source_entity, schema.target_entity, schema.source_entity
    )
    blocks = {
        name: samples[samples["split"].isin(splits)].groupby(["entity", "user_key"])["label"]
        for name, splits in (("train", ["train"]), ("fit", ["train", "valid"]))
    }
    users = samples["user_key"].to_numpy()

    def total(count: str, block: str, of: np.ndarray) -> np.ndarray:
        g = blocks[block]
        values = (g.size() if count == "rows" else g.sum()).to_dict()
        return np.array([values.get((e, u), 0) for e, u in zip(of, users, strict=True)])

    out = {}
    for count in ACTIVITY_COUNTS:
        own = np.select(
            [split == "train", split == "valid"],
            [before[count].reindex(samples.index).to_numpy(), total(count, "train", entity)],
            total(count, "fit", entity),
        )
        other = np.where(
            split == "test", total(count, "fit", other_entity), total(count, "train", other_entity)
        )
        out[activity_feature(count, "own")] = own
        out[activity_feature(count, "other")] = other
    return out


def raw_requests(built: Built, rows: pd.DataFrame) -> list[dict]:
    """Each test row as a serving request: its raw line's fields as text, the user's recent
    likes as raw item ids and, with activity features, the user's rows and likes of each
    entity (what a feature store would hold). For a test row in frozen mode (docs/etl.md)
    those are the user's train and valid rows of each entity, in line order."""
    schema = built.schema
    likes: dict[tuple[str, int], list[tuple[int, str]]] = defaultdict(list)
    s = built.samples
    fit = s[s["split"].isin(["train", "valid"]) & (s["label"] == 1)]
    for entity, user, line_no in fit[["entity", "user_key", "line_no"]].itertuples(index=False):
        likes[(entity, user)].append((line_no, built.lines[entity][line_no]["item_id"]))
    fit_rows = s[s["split"].isin(["train", "valid"])].groupby(["entity", "user_key"])["label"]
    counts = {"rows": fit_rows.size().to_dict(), "likes": fit_rows.sum().to_dict()}
    source, target = schema.source_entity, schema.target_entity
    activity = [
        (activity_feature(c, relation), c, entity)
        for relation, entity in (("own", target), ("other", source))
        for c in ACTIVITY_COUNTS
        if activity_feature(c, relation) in {f.name for f in schema.features}
    ]
    requests = []
    for user, line_no in rows[["user_key", "line_no"]].itertuples(index=False):
        request: dict = dict(built.lines[schema.target_entity][line_no])
        request[RECENT_LIKES] = {
            e: [item for _, item in sorted(likes[(e, user)])][-schema.seq_len :][::-1]
            for e in schema.entities
        }
        for name, count, entity in activity:
            request[name] = int(counts[count].get((entity, user), 0))
        requests.append(request)
    return requests


def training_scores(tem: TEM, schema: FeatureSchema, rows: pd.DataFrame) -> np.ndarray:
    with torch.no_grad():
        batch = to_tensors(schema, {c: rows[c].to_numpy() for c in rows.columns})
        return torch.sigmoid(tem(batch)["logit"]).double().numpy()


# --------------------------------------------------------------------------------------------
# One definition of the encoding: the serving encoder reproduces the ETL's indices.
# --------------------------------------------------------------------------------------------


def test_number_parsing_and_trimming_match_spark(spark) -> None:
    from pyspark.sql import functions as F

    texts = [*ODD_NUMBERS, "+NaN", "-NaN", "  12  ", "\u20027", "0b1", "0x1p-2d", "-.0"]
    frame = spark.createDataFrame([(t,) for t in texts], "v string")
    rows = frame.select(
        "v", F.trim("v").alias("t"), F.trim("v").try_cast("double").alias("d")
    ).collect()
    for row in rows:
        assert clean_text(row.v) == row.t, row.v
        ours = parse_number(row.t)
        if row.d is None or ours is None:
            assert ours is None and row.d is None, (row.v, ours, row.d)
        else:
            assert ours == row.d or (math.isnan(ours) and math.isnan(row.d)), (row.v, ours)

    # Integer ids: the ETL's trim, then try_cast to BIGINT.
    ids = [*ODD_NUMBERS, *(f.format(7) for f in ODD_IDS), "9223372036854775807"]
    ids += ["9223372036854775808", "-9223372036854775808", "-9223372036854775809", "+", "7L"]
    frame = spark.createDataFrame([(t,) for t in ids], "v string")
    for row in frame.select("v", F.trim("v").try_cast("long").alias("n")).collect():
        assert parse_integer_id(clean_text(row.v)) == row.n, row.v


def test_encoder_reproduces_every_etl_index(built: Built) -> None:
    """Every raw line of both files, every non-sequence feature: mkt.encoding gives exactly
    the index the Spark job wrote (specific features of the other entity included: 0)."""
    schema = built.schema
    vocab = built.vocab
    # From the ETL's own schema file: its reserved indices are checked against mkt.encoding's.
    schema_file = built.out / "feature_schema.json"
    encoder = FeatureEncoder.from_schema_file(
        json.loads(schema_file.read_text()),
        {c: vocab.column(c).to_pylist() for c in ("feature", "entity", "raw_value", "index")},
        origin=str(schema_file),
    )
    assert encoder.schema == schema
    activity = raw_activity(built.samples, schema)
    planted = 0
    for entity in schema.entities:
        rows = built.samples[built.samples["entity"] == entity]
        raw = [built.lines[entity][n] for n in rows["line_no"]]
        planted += int((rows["user_key"] == PLANTED_USER).sum())
        for f in schema.features:
            if f.group == "sequence":
                continue
            if f.name in activity:
                values = list(activity[f.name][rows.index])
            else:
                values = [line.get(f.name) for line in raw]
            got = encoder.encode(f.name, values, entity)
            expected = rows[f.name].to_numpy()
            bad = np.flatnonzero(got != expected)
            assert not len(bad), (
                f"{entity}.{f.name}: {len(bad)} rows differ, e.g. raw {values[bad[0]]!r} -> "
                f"{got[bad[0]]}, ETL {expected[bad[0]]}"
            )
    assert planted == PLANTED_ARTICLE_LINES + 60
    # The planted values reached the missing and the OOV index.
    planted_rows = built.samples[built.samples["user_key"] == PLANTED_USER]
    for name in ("category_first", "item_score1", "video_category"):
        assert {1, 2} <= set(planted_rows[name]), name


# --------------------------------------------------------------------------------------------
# The artifact.
# --------------------------------------------------------------------------------------------


def test_artifact_scores_raw_test_rows_like_the_training_model(
    built: Built, trained: Trained
) -> None:
    """Raw test rows -> the artifact -> the same indices as `samples` and the training
    model's probabilities (max abs difference < 1e-5)."""
    rows = target_test_rows(built)
    assert (rows["user_key"] == PLANTED_USER).sum() == 44
    requests = raw_requests(built, rows)
    packed = trained.artifact.encode(requests)
    assert packed.errors == {}
    interface = trained.artifact.interface
    assert np.array_equal(packed.scalars, rows[list(interface.scalars)].to_numpy())
    for s, name in enumerate(interface.sequences):
        assert np.array_equal(packed.sequences[:, s], np.stack(rows[name].to_numpy())), name
    result = trained.artifact.score(requests)
    expected = training_scores(trained.tem, built.schema, rows)
    assert result.ok.all()
    assert np.abs(result.scores - expected).max() < 1e-5
    assert expected.std() > 0  # a trained model, not a constant
    # Columns, and an Arrow table (recent likes a struct of lists), read the same.
    columns = {k: [r[k] for r in requests] for k in requests[0]}
    assert np.array_equal(trained.artifact.score(columns).scores, result.scores)
    assert np.array_equal(
        trained.artifact.score(pa.Table.from_pylist(requests)).scores, result.scores
    )


def test_graph_leaves_out_the_range_guard_the_training_model_keeps(
    built: Built, trained: Trained
) -> None:
    """The exported graph trusts the encoder's indices (docs/serving.md, "Speed"): a foreign
    index fails the lookup there, while the training model, whose guard the export restores,
    still reads it as OOV. The artifact runs it rewritten, with the same results."""
    banks = [m for m in trained.tem.modules() if isinstance(m, EmbeddingBank)]
    assert banks and all(bank.range_guard for bank in banks)
    item = built.schema.item_feature
    huge = torch.tensor([10**9])
    assert torch.equal(banks[0].lookup(item, huge), banks[0].lookup(item, torch.tensor([OOV])))
    packed = trained.artifact.encode(raw_requests(built, target_test_rows(built).iloc[:2]))
    scalars = torch.from_numpy(packed.scalars.copy())
    sequences = torch.from_numpy(packed.sequences)
    # The rewritten graph (mkt.serving.graph.runnable) computes exactly what torch.export's
    # module does, at one row and at several.
    exported = trained.artifact.program.module()
    for rows in (1, 2):
        with torch.inference_mode():
            expected = exported(scalars[:rows], sequences[:rows])
        assert torch.equal(trained.artifact.run_graph(scalars[:rows], sequences[:rows]), expected)
    scalars[:, trained.artifact.interface.scalars.index(item)] = 10**9
    with pytest.raises((IndexError, RuntimeError), match=r"out of range|index"):
        trained.artifact.run_graph(scalars, sequences)


def test_bad_rows_get_a_reason_and_the_rest_are_scored(built: Built, trained: Trained) -> None:
    rows = target_test_rows(built).iloc[:4]
    good = raw_requests(built, rows)
    alone = trained.artifact.score(good).scores
    seq_len = built.schema.seq_len
    missing_field = {k: v for k, v in good[0].items() if k != "age"}
    wrong_type = {**good[1], "item_score1": [3]}
    float_id = {**good[1], "user_id": 3.5}
    oversized = {**good[2], RECENT_LIKES: {"video": ["1"] * (seq_len + 1), "article": []}}
    no_likes_entity = {**good[2], RECENT_LIKES: {"video": []}}
    unknown_entity = {**good[3], RECENT_LIKES: {**good[3][RECENT_LIKES], "audio": []}}
    bad_item = {**good[3], RECENT_LIKES: {"video": [{"id": 1}], "article": []}}
    text_id = {**good[0], "item_id": "7a"}
    missing_id = {**good[0], "user_id": None}
    text_like = {**good[0], RECENT_LIKES: {"video": ["+3", "x"], "article": []}}
    batch = [good[0], missing_field, good[1], wrong_type, float_id, good[2], oversized]
    batch += [no_likes_entity, "not a row", unknown_entity, good[3], bad_item]
    batch += [text_id, missing_id, text_like]
    result = trained.artifact.score(batch)
    expected_errors = {
        1: "age: missing field",
        3: "item_score1: wrong type list",
        4: "user_id: wrong type float",
        6: f"recent_likes.video: {seq_len + 1} items, more than seq_len {seq_len}",
        7: "recent_likes.article: missing field",
        8: "row is a str",
        9: "recent_likes.audio: not an entity",
        11: "recent_likes.video: item of wrong type dict",
        # The ETL quarantines a line whose id is missing or not an integer: never scored.
        12: "item_id: not a 64-bit integer id: '7a'",
        13: "user_id: missing id",
        14: "recent_likes.video: not a 64-bit integer id: 'x'",
    }
    assert set(result.errors) == set(expected_errors)
    for row, text in expected_errors.items():
        assert text in result.errors[row], result.errors[row]
    assert np.isnan(result.scores[list(expected_errors)]).all()
    assert np.array_equal(result.scores[[0, 2, 5, 10]], alone)
    # None is a present, missing value (like \N in the raw file), not an error.
    assert trained.artifact.score([{**good[0], "age": None}]).errors == {}


def test_artifact_holds_no_source_entity_parameters(trained: Trained, built: Built) -> None:
    schema = built.schema
    weights = dict(trained.artifact.program.state_dict)
    source_specific = [f.name for f in schema.specific_features(schema.source_entity)]
    for name in weights:
        assert not any(f".tables.{f}." in name for f in source_specific), name
        assert "extractors" not in name and "towers" not in name, name
    mem = trained.mem
    source_only = [
        *mem.hfa[schema.source_entity].parameters(),
        *mem.extractors[schema.source_entity].parameters(),
        *mem.towers[schema.source_entity].parameters(),
        *mem.cke.gates[schema.source_index].parameters(),
        *(mem.inputs.embeddings.tables[f].weight for f in source_specific),
        *mem.entity_user[schema.source_entity].parameters(),
        *mem.interest[schema.source_entity].parameters(),
    ]
    for p in source_only:
        same_shape = [w for w in weights.values() if w.shape == p.shape]
        assert not any(torch.equal(w, p.detach()) for w in same_shape)
    # Sizes: the manifest reports every file's, and they are the files on disk.
    manifest = trained.artifact.manifest
    on_disk = {
        p.relative_to(trained.artifact_dir).as_posix(): p.stat().st_size
        for p in trained.artifact_dir.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert {k: v["bytes"] for k, v in manifest["files"].items()} == on_disk
    assert manifest["total_bytes"] == sum(on_disk.values())
    # The weights file is its tensors' float32 bytes plus a small header: 4 bytes per
    # parameter of the online part, within 10%.
    stored = [*trained.artifact.program.state_dict.values()]
    stored += [*trained.artifact.program.constants.values()]
    assert all(t.dtype == torch.float32 for t in stored), {t.dtype for t in stored}
    numel = sum(t.numel() for t in stored)
    assert manifest["tensor_elements"] == numel
    assert manifest["tensor_bytes"] == 4 * numel
    weights_bytes = manifest["files"]["model/weights.safetensors"]["bytes"]
    assert 4 * numel < weights_bytes <= 1.1 * 4 * numel, (weights_bytes, numel)
    print(
        f"artifact: {manifest['total_bytes']} bytes, weights {weights_bytes} bytes for "
        f"{numel} parameters"
    )


def test_altered_or_unsafe_artifacts_are_refused(trained: Trained, tmp_path: Path) -> None:
    files = read_artifact_files(trained.artifact_dir)

    def refused(changed: dict[str, bytes], reason: str) -> None:
        with pytest.raises(ArtifactError, match=reason):
            Artifact.from_files(changed)

    weights = bytearray(files["model/weights.safetensors"])
    weights[-1] ^= 1
    refused({**files, "model/weights.safetensors": bytes(weights)}, "sha256 differs")
    refused({**files, "vocab/extra.parquet": b"x"}, "not listed")
    refused({k: v for k, v in files.items() if k != "vocab/age.parquet"}, "missing")

    def with_graph(edit) -> dict[str, bytes]:
        """The graph edited, and the manifest's checksum updated to match (as an attacker
        who can write the directory would)."""
        graph = json.loads(files["model/graph.json"])
        edit(graph)
        data = json.dumps(graph).encode()
        manifest = json.loads(files["manifest.json"])
        manifest["files"]["model/graph.json"]["sha256"] = hashlib.sha256(data).hexdigest()
        return {**files, "model/graph.json": data, "manifest.json": json.dumps(manifest).encode()}

    def os_call(graph: dict) -> None:
        graph["graph_module"]["graph"]["nodes"][0]["target"] = "torch.os.system"

    def guard_code(graph: dict) -> None:
        graph["guards_code"] = ["__import__('os').system('true')"]

    def shape_code(graph: dict) -> None:
        batch_size = graph["graph_module"]["graph"]["tensor_values"]["scalars"]["sizes"][0]
        batch_size["as_expr"]["expr_str"] = "__import__('os').getcwd()"

    refused(with_graph(os_call), "calls 'torch.os.system'")
    refused(with_graph(guard_code), "guard code")
    refused(with_graph(shape_code), "not arithmetic")
    assert Artifact.from_files(with_graph(lambda graph: None)).manifest == trained.artifact.manifest

    # Another torch major.minor than the one that exported the graph: refused, naming the
    # manifest and both versions (the manifest carries no checksum of its own).
    def with_torch(version: str) -> dict[str, bytes]:
        manifest = json.loads(files["manifest.json"])
        manifest["torch_version"] = version
        return {**files, "manifest.json": json.dumps(manifest).encode()}

    running = re.match(r"\d+\.\d+", torch.__version__).group(0)
    major, minor = map(int, running.split("."))
    other = f"{major}.{minor + 1}.0"
    with pytest.raises(ArtifactError) as refusal:
        Artifact.from_files(with_torch(other), origin="ART")
    text = str(refusal.value)
    assert text.startswith("ART/manifest.json:"), text
    assert f"exported with torch {other}" in text and f"runs torch {torch.__version__}" in text
    refused(with_torch("unknown"), "not a torch version")
    Artifact.from_files(with_torch(f"{running}.99+other"))  # another patch release: loads

    # Reserved indices in the artifact's schema other than mkt.encoding's: refused.
    schema = json.loads(files["feature_schema.json"])
    schema["reserved_indices"] = {"padding": 0, "missing": 2, "oov": 1}
    data = json.dumps(schema).encode()
    manifest = json.loads(files["manifest.json"])
    manifest["files"]["feature_schema.json"]["sha256"] = hashlib.sha256(data).hexdigest()
    changed = {**files, "feature_schema.json": data, "manifest.json": json.dumps(manifest).encode()}
    refused(changed, r"feature_schema.json: reserved_indices .* differ from mkt.encoding's")


def test_export_stamps_the_run_and_rejects_an_unfinished_one(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from train.export import final_chain, read_run, run_stamp
    from train.export import main as export_main

    run = trained.artifact.manifest["run"]
    assert run["run_id"].startswith("run-7-")
    assert run["pipeline"] == "mkt" and [s["model"] for s in run["stages"]] == ["mem", "tem", "tem"]
    assert len(run["config_sha256"]) == 64 and len(run["schema_sha256"]) == 64
    # The code's commit: HEAD of this checkout, or null outside a git checkout.
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    if (REPO / ".git").exists() and head.returncode == 0:
        assert (
            run["export_code_commit"] == head.stdout.strip()
            and len(run["export_code_commit"]) == 40
        )
    else:
        assert run["export_code_commit"] is None
    # The same run gets the same stamp.
    config, metrics = read_run(trained.run_dir)
    links = final_chain(config, metrics, trained.run_dir)
    assert run_stamp(trained.run_dir, config, metrics, links) == run
    # Not over an existing artifact; not from a run without metrics.json.
    argv = ["--run", str(trained.run_dir), "--output", str(trained.artifact_dir)]
    assert export_main(argv) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    shutil.copytree(trained.run_dir, unfinished)
    (unfinished / "metrics.json").unlink()
    assert export_main(["--run", str(unfinished), "--output", str(tmp_path / "x")]) == 2
    assert "the run has not finished" in capsys.readouterr().err
    # Samples whose schema's reserved indices differ from mkt.encoding's: not exported.
    drifted = tmp_path / "drifted"
    shutil.copytree(trained.run_dir, drifted)
    samples = tmp_path / "samples"
    samples.mkdir()
    schema = json.loads((Path(run["samples"]) / "feature_schema.json").read_text())
    schema["reserved_indices"]["oov"] = 3
    (samples / "feature_schema.json").write_text(json.dumps(schema))
    config = (drifted / "config.yaml").read_text().replace(run["samples"], str(samples))
    (drifted / "config.yaml").write_text(config)
    assert export_main(["--run", str(drifted), "--output", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert f"{samples / 'feature_schema.json'}: reserved_indices" in err, err
    assert "'oov': 3" in err and "'oov': 2" in err
    with pytest.raises(EncodingContractError, match="no 'reserved_indices'"):
        check_reserved_indices({}, "schema")


# --------------------------------------------------------------------------------------------
# Batch scoring on Ray.
# --------------------------------------------------------------------------------------------


def run_score(argv: list[str]) -> tuple[int, dict | None, str]:
    """`python train/score.py ARGV` as its own process with its own local Ray, as users run it
    (a fresh process: in this test process other tests have already started and stopped Ray,
    and Ray Data's actor pool then lost every scoring actor before it ran).
    -> (exit status, the printed summary or None, stderr)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(REPO / "train" / "score.py"), *argv, "--num-cpus", "2"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    # The summary is the last thing printed: a JSON object opening on a line of its own.
    starts = [m.start() for m in re.finditer(r"^\{$", done.stdout, flags=re.MULTILINE)]
    summary = json.loads(done.stdout[starts[-1] :]) if done.returncode == 0 and starts else None
    return done.returncode, summary, done.stdout[-3000:] + done.stderr[-3000:]


def test_a_batch_that_raises_is_scored_row_by_row(
    built: Built, trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The score job's actor, called in-process: when scoring a batch raises anyway (past every
    pre-check), its rows are scored one by one; a row that still fails is kept with the
    exception as its error, like a rejected row, and the others are scored."""
    from train.score import SCORING_FAILED, BatchScorer

    schema = built.schema
    rows = DeltaTable(str(built.out / "samples")).to_pyarrow_table(
        filters=[("entity", "=", schema.target_entity), ("split", "=", "test")]
    )
    rows = rows.sort_by("line_no").slice(0, 6)
    bad_row = rows.to_pylist()[4]
    bad_row["age"] = None  # rejected by the row checks, as before
    rows = pa.concat_tables([rows, pa.Table.from_pylist([bad_row], schema=rows.schema)])
    scorer = BatchScorer(read_artifact_files(trained.artifact_dir), "samples", torch_threads=1)
    expected = scorer.artifact.score_samples(rows)
    planted = int(rows.column("line_no")[2].as_py())
    score_samples = scorer.artifact.score_samples

    def failing(batch: pa.Table):
        if planted in batch.column("line_no").to_pylist():
            raise RuntimeError(f"planted failure; line {planted}")
        return score_samples(batch)

    monkeypatch.setattr(scorer.artifact, "score_samples", failing)
    out = scorer(rows).to_pandas()
    assert out["line_no"].tolist() == rows.column("line_no").to_pylist()
    assert out.loc[2, "error"] == f"{SCORING_FAILED}: RuntimeError: planted failure, line {planted}"
    assert out.loc[6, "error"] == expected.errors[6] and "age: null" in expected.errors[6]
    assert out.loc[[2, 6], "score"].isna().all()
    ok = [0, 1, 3, 4, 5]
    assert out.loc[ok, "error"].isna().all()
    assert np.abs(out.loc[ok, "score"].to_numpy() - expected.scores[ok]).max() < 1e-6
    # A batch that does not raise is scored whole, in one call, as before.
    calls: list[int] = []

    def counted(batch: pa.Table):
        calls.append(batch.num_rows)
        return score_samples(batch)

    monkeypatch.setattr(scorer.artifact, "score_samples", counted)
    clean = rows.slice(3, 3)
    assert scorer(clean).column("score").to_pylist() == score_samples(clean).scores.tolist()
    assert calls == [3]


def test_score_job_fails_when_every_row_fails_inside_the_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """Bad rows do not fail the job, but every row failing inside the model (a broken
    artifact or runtime) must not exit 0."""
    import train.score as score

    def summary(failed: int, rows: int = 5):
        return {"rows": rows, "rejected_by_field": {score.SCORING_FAILED: failed} if failed else {}}

    argv = ["--artifact", "a", "--input", "i", "--output", "o"]
    monkeypatch.setattr(score, "score_table", lambda args: summary(5))
    assert score.main(argv) == 1
    assert "scoring raised on every one of the 5 rows" in capsys.readouterr().err
    monkeypatch.setattr(score, "score_table", lambda args: summary(4))
    assert score.main(argv) == 0
    monkeypatch.setattr(score, "score_table", lambda args: summary(0, rows=0))
    assert score.main(argv) == 0


def _with_bad_samples(table: pa.Table, vocab_size: int, seq_len: int) -> pa.Table:
    """Three copies of target test rows, each broken in one way, at new line numbers."""
    rows = table.slice(0, 3).to_pylist()
    for k, row in enumerate(rows):
        row["line_no"] += 10**7 + k
    rows[0]["age"] = None
    rows[1]["seq_video"] = [*rows[1]["seq_video"], 0]
    rows[2]["item_id"] = vocab_size
    assert len(rows[1]["seq_video"]) == seq_len + 1
    # The samples table declares its columns non-null; a user's table to score need not.
    nullable = pa.schema([field.with_nullable(True) for field in table.schema])
    bad = pa.Table.from_pylist(rows, schema=nullable)
    return pa.concat_tables([table.cast(nullable), bad])


def test_score_job_writes_scores_and_keeps_bad_rows(
    built: Built, trained: Trained, tmp_path: Path
) -> None:
    schema = built.schema
    samples = DeltaTable(str(built.out / "samples")).to_pyarrow_table()
    split = pc.field("split") == "test"
    test_rows = samples.filter(split & (pc.field("entity") == schema.target_entity))
    other = samples.filter(split & (pc.field("entity") == schema.source_entity))
    table = _with_bad_samples(test_rows, schema.feature("item_id").vocab_size, schema.seq_len)
    source = tmp_path / "to_score"
    write_deltalake(
        str(source),
        pa.concat_tables([table, other.cast(table.schema)]),
        partition_by=["entity", "split"],
    )
    # Two scoring actors of half a CPU each: as fast as one here (measured), and the batches
    # are shared between actors as on a cluster.
    common = ["--artifact", str(trained.artifact_dir), "--workers", "2"]
    common += ["--cpus-per-worker", "0.5", "--batch-size", "64"]

    out = tmp_path / "scores"
    status, summary, log = run_score(
        [*common, "--input", str(source), "--output", str(out), "--split", "test"]
    )
    assert status == 0 and summary is not None, log
    assert summary["rows"] == table.num_rows and summary["rejected"] == 3
    assert summary["rejected_by_field"] == {"age": 1, "item_id": 1, "seq_video": 1}
    written = DeltaTable(str(out)).to_pandas().set_index("line_no").sort_index()
    assert list(DeltaTable(str(out)).schema().to_arrow().names) == [
        "entity",
        "line_no",
        "score",
        "error",
    ]
    assert set(written["entity"]) == {schema.target_entity}
    rejected = written[written["error"].notna()]
    assert rejected["score"].isna().all() and (rejected.index >= 10**7).all()
    rows = target_test_rows(built).set_index("line_no")
    scored = written[written["error"].isna()]
    assert sorted(scored.index) == sorted(rows.index)
    expected = training_scores(trained.tem, schema, rows.loc[scored.index].reset_index())
    assert np.abs(scored["score"].to_numpy() - expected).max() < 1e-5

    # Raw requests: the same scores; an oversized recent-likes list is kept as a rejected row.
    requests = raw_requests(built, rows.reset_index())
    for request, line_no in zip(requests, rows.index, strict=True):
        request["line_no"] = int(line_no)
    oversized = {"video": ["1"] * (schema.seq_len + 1), "article": []}
    requests.append({**requests[0], "line_no": -1, RECENT_LIKES: oversized})
    raw_source = tmp_path / "raw_requests"
    write_deltalake(str(raw_source), pa.Table.from_pylist(requests))
    raw_out = tmp_path / "raw_scores"
    argv = [*common, "--kind", "raw", "--input", str(raw_source), "--output", str(raw_out)]
    status, summary, log = run_score(argv)
    assert status == 0 and summary is not None, log
    assert summary["rejected_by_field"] == {"recent_likes.video": 1}
    raw_written = DeltaTable(str(raw_out)).to_pandas().set_index("line_no").sort_index()
    assert "more than seq_len" in raw_written.loc[-1, "error"]
    raw_scores = raw_written.drop(index=-1)["score"]
    # Not bit for bit: the rows meet the graph in other batches.
    assert (
        np.abs(raw_scores.to_numpy() - scored.loc[raw_scores.index, "score"].to_numpy()).max()
        < 1e-6
    )

    # A table the artifact cannot read fails at once, naming the column.
    status, _, log = run_score(
        [*common, "--input", str(raw_source), "--output", str(tmp_path / "x")]
    )
    assert status == 2 and "lacks columns" in log
