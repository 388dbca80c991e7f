"""etl/build_samples.py end to end: real local Spark, real Delta tables, real Ray.

The expected samples are recomputed here in plain Python straight from the raw CSV text
(quarantine rules, split, sequences, vocabularies), independently of the Spark code, and
compared row by row. That comparison is the leakage test: the reference only ever puts
likes from earlier lines (and, in frozen mode, from earlier split blocks) into a row's
features, so any leak in the job shows up as a mismatch.
"""

from __future__ import annotations

import bisect
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from etl.build_samples import InputError, _discard_run, build_samples
from etl.config import DataConfig, load_config
from etl.samples_pass import ROW_ORDER_SEED
from etl.split import _log_summary
from etl.storage import HadoopFs, WriterError, resolve_writer
from jobs.generate_tenrec import COLUMNS, generate
from jobs.min_count_sweep import data_config
from mkt.contract import ACTIVITY_BOUNDARIES, FIRST_INDEX, activity_feature

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TENREC_CONFIG = REPO / "conf" / "data" / "tenrec.yaml"


def tenrec_config() -> DataConfig:
    """The Tenrec config as the fixtures build it: with the activity features (off in the
    file), so that every test checks them too."""
    return load_config(TENREC_CONFIG).with_overrides(activity=True)


MISSING = ("\\N", "")
HEAVY_USER = 10**6


# --------------------------------------------------------------------------------------------
# Independent reference implementation over the raw text.
# --------------------------------------------------------------------------------------------


@dataclass
class RefRow:
    entity: str
    line_no: int
    user: int
    label: int
    values: dict[str, str]  # raw column -> stripped value
    split: str = ""
    seqs: dict[str, list[str]] = field(default_factory=dict)  # entity -> raw items, newest first
    # activity feature -> the count of rows or likes of the history the row sees
    activity: dict[str, int] = field(default_factory=dict)


@dataclass
class Reference:
    rows: dict[tuple[str, int], RefRow]
    bad: dict[tuple[str, int], tuple[str, str]]  # (entity, line_no) -> (raw line, reason kind)
    lines: dict[str, int]  # data lines per entity
    removed: dict[str, int]  # exact duplicates removed per entity


def reference(raw_dir: Path, config: DataConfig) -> Reference:
    rows: dict[tuple[str, int], RefRow] = {}
    bad: dict[tuple[str, int], tuple[str, str]] = {}
    lines: dict[str, int] = {}
    removed: dict[str, int] = {}
    for entity in config.entity_names:
        text = (raw_dir / config.entity(entity).file).read_text()
        raw_lines = text.split("\n")
        if text.endswith("\n"):
            raw_lines.pop()
        header = [c.strip() for c in raw_lines[0].split(",")]
        lines[entity] = len(raw_lines) - 1
        removed[entity] = 0
        seen: set[str] = set()
        for line_no, line in enumerate(raw_lines[1:], start=1):
            kind = _reference_reason(line, header, config)
            if kind:
                bad[(entity, line_no)] = (line, kind)
                continue
            if config.duplicates == "drop" and line in seen:
                removed[entity] += 1
                continue
            seen.add(line)
            values = dict(zip(header, (v.strip() for v in line.split(",")), strict=True))
            rows[(entity, line_no)] = RefRow(
                entity, line_no, int(values[config.user_key]), int(values[config.label]), values
            )
    _reference_splits_and_sequences(rows, config)
    return Reference(rows, bad, lines, removed)


def _reference_reason(line: str, header: list[str], config: DataConfig) -> str | None:
    fields = line.split(",")
    if len(fields) != len(header):
        return "wrong column count"
    values = dict(zip(header, (v.strip() for v in fields), strict=True))
    for column in (config.user_key, *config.id_columns):
        if values[column] == "":
            return f"empty {column}"
        if not re.fullmatch(r"[+-]?\d+", values[column]):
            return f"non-numeric {column}"
    if values[config.label] not in ("0", "1"):
        return f"label {config.label} not in {{0,1}}"
    return None


def _reference_splits_and_sequences(
    rows: dict[tuple[str, int], RefRow], config: DataConfig
) -> None:
    item = config.feature(config.item_feature)
    by_user: dict[tuple[str, int], list[RefRow]] = defaultdict(list)
    for key in sorted(rows):
        by_user[(key[0], rows[key].user)].append(rows[key])
    for user_rows in by_user.values():
        n = len(user_rows)
        n_test = math.floor(config.test_fraction * n + 0.5)
        n_fit = n - n_test
        n_train = n_fit - math.floor(config.valid_fraction * n_fit + 0.5)
        for rank, row in enumerate(user_rows, start=1):
            row.split = "train" if rank <= n_train else "valid" if rank <= n_fit else "test"

    # Before which splits a row may look, in frozen mode (a train row: earlier train lines);
    # in another entity's file, at all lines of those splits in both modes (no shared clock).
    visible = {"train": {"train"}, "valid": {"train"}, "test": {"train", "valid"}}

    def seen(row: RefRow, other: str) -> list[RefRow]:
        """The rows of `other` in the history `row` sees, in line order."""
        own = other == row.entity
        return [
            p
            for p in by_user.get((other, row.user), [])
            if (not own or p.line_no < row.line_no)
            and (p.split in visible[row.split] or (own and config.history_mode == "online"))
        ]

    for user_rows in by_user.values():
        for row in user_rows:
            for other in config.entity_names:
                history = seen(row, other)
                likes = [p.values[item.columns[other]] for p in history if p.label == 1]
                row.seqs[other] = list(reversed(likes[-config.seq_len :]))
                relation = "own" if other == row.entity else "other"
                row.activity[activity_feature("rows", relation)] = len(history)
                row.activity[activity_feature("likes", relation)] = sum(p.label for p in history)


def reference_vocab_counts(
    ref: Reference, config: DataConfig, trimmed: bool = True
) -> dict[str, Counter]:
    """feature -> Counter of (entity or None, raw value) over the train split; `trimmed`:
    only the values on at least `min_count` train rows (those with an index)."""
    counts: dict[str, Counter] = {}
    for f in config.features:
        if f.kind != "categorical":
            continue
        counter: Counter = Counter()
        for row in ref.rows.values():
            if row.split == "train" and row.entity in f.columns:
                value = row.values[f.columns[row.entity]]
                if value not in MISSING:
                    counter[(row.entity if f.per_entity_ids else None, value)] += 1
        if trimmed:
            counter = Counter({k: n for k, n in counter.items() if n >= f.min_count})
        counts[f.name] = counter
    return counts


# --------------------------------------------------------------------------------------------
# Fixtures: Tenrec-format data (generated + planted defects) and the built OUT_DIR.
# --------------------------------------------------------------------------------------------


def _csv_line(entity: str, **values: object) -> str:
    return ",".join(str(values.get(c, 0)) for c in COLUMNS[entity])


def _heavy_user_lines() -> dict[str, list[str]]:
    """A user with more likes than seq_len, missing and unseen values in known places."""
    video = []
    for i in range(120):
        category: object = i % 5
        item: object = 1 + i % 30
        if i == 0:
            category = "\\N"
        elif i == 1:
            category = ""
        elif i == 119:  # last line: test split; value and item never seen in train
            category, item = "zz_unseen", 9_999_999
        like = int(i % 3 == 0)
        video.append(
            _csv_line(
                "video",
                user_id=HEAVY_USER,
                item_id=item,
                like=like,
                click=like,
                video_category=category,
                gender=1,
                age=3,
            )
        )
    article = []
    for i in range(60):
        article.append(
            _csv_line(
                "article",
                user_id=HEAVY_USER,
                item_id=8_888_888 if i == 59 else 1 + i % 20,
                like=int(i % 4 == 0),
                click=1,
                gender=1,
                age=3,
                exposure_count=10 * i,
                click_count=i,
                like_count=i % 7,
                comment_count=i % 3,
                item_score1="abc" if i == 1 else i % 10,
                item_score2=i % 5,
                item_score3=i,
                category_first="\\N" if i == 2 else i % 4,
                category_second=i % 9,
            )
        )
    return {"video": video, "article": article}


# (raw line, reason kind) per entity; inserted at spread-out positions.
BAD_LINES = {
    "video": [
        ("1,2,3", "wrong column count"),
        ("", "wrong column count"),
        ("abc,5,0,0,0,0,3,0,1,2", "non-numeric user_id"),
        (",5,0,0,0,0,3,0,1,2", "empty user_id"),
        ("7,5,0,0,2,0,3,0,1,2", "label like not in {0,1}"),
        ("7,x9,0,0,0,0,3,0,1,2", "non-numeric item_id"),
    ],
    "article": [
        (_csv_line("article", user_id=3, item_id=4) + ",extra", "wrong column count"),
        (_csv_line("article", user_id=3, item_id=4, like="yes"), "label like not in {0,1}"),
    ],
}


@dataclass
class RawFixture:
    dir: Path
    bad: dict[tuple[str, int], str]  # (entity, line_no) -> reason kind
    heavy_lines: dict[str, list[int]]  # entity -> line numbers of the heavy user


@pytest.fixture(scope="module")
def tenrec_raw(tmp_path_factory: pytest.TempPathFactory) -> RawFixture:
    raw = tmp_path_factory.mktemp("raw")
    generate(raw, num_users=150, seed=7)
    bad: dict[tuple[str, int], str] = {}
    heavy_lines: dict[str, list[int]] = {}
    for entity, file in (("video", "QK-video.csv"), ("article", "QK-article.csv")):
        header, *data = (raw / file).read_text().rstrip("\n").split("\n")
        step = len(data) // (len(BAD_LINES[entity]) + 1)
        # Insert from the back so earlier positions stay valid.
        for i, (line, _) in reversed(list(enumerate(BAD_LINES[entity]))):
            data.insert((i + 1) * step, line)
        heavy = _heavy_user_lines()[entity]
        start = len(data) + 1
        data += heavy
        heavy_lines[entity] = list(range(start, start + len(heavy)))
        for line_no, line in enumerate(data, start=1):
            for bad_line, kind in BAD_LINES[entity]:
                if line == bad_line:
                    bad[(entity, line_no)] = kind
        (raw / file).write_text("\n".join([header, *data]) + "\n")
    return RawFixture(raw, bad, heavy_lines)


@dataclass
class Built:
    out: Path
    summary: dict
    schema: dict
    samples: pd.DataFrame
    vocab: pd.DataFrame
    quarantine: pd.DataFrame
    version: int


def load_built(out: Path, summary: dict) -> Built:
    def table(name: str) -> pd.DataFrame:
        return DeltaTable(str(out / name)).to_pyarrow_table().to_pandas()

    return Built(
        out=out,
        summary=summary,
        schema=json.loads((out / "feature_schema.json").read_text()),
        samples=table("samples").sort_values(["entity", "line_no"]).reset_index(drop=True),
        vocab=table("vocab"),
        quarantine=table("quarantine"),
        version=DeltaTable(str(out / "samples")).version(),
    )


@pytest.fixture(scope="module")
def built(spark, tenrec_raw: RawFixture, tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("out") / "tenrec"
    # Small input splits, so each raw file is read as several byte ranges: line numbers
    # must still follow the file across split boundaries.
    spark.conf.set("spark.sql.files.maxPartitionBytes", "16k")
    try:
        summary = build_samples(spark, TENREC_CONFIG, tenrec_raw.dir, out, activity=True)
    finally:
        spark.conf.unset("spark.sql.files.maxPartitionBytes")
    return load_built(out, summary)


@pytest.fixture(scope="module")
def tenrec_reference(tenrec_raw: RawFixture) -> Reference:
    return reference(tenrec_raw.dir, tenrec_config())


# --------------------------------------------------------------------------------------------
# Shared checks (used for both entity pairs).
# --------------------------------------------------------------------------------------------


def item_lookup(vocab: pd.DataFrame, config: DataConfig) -> dict[tuple[str | None, str], int]:
    rows = vocab[vocab.feature == config.item_feature]
    return {
        (e, v): int(i) for e, v, i in zip(rows.entity, rows.raw_value, rows["index"], strict=True)
    }


def assert_matches_reference(b: Built, ref: Reference, config: DataConfig) -> None:
    """Every sample row equals the reference: same rows, split, label, sequences."""
    assert set(zip(b.samples.entity, b.samples.line_no, strict=True)) == set(ref.rows)
    items = item_lookup(b.vocab, config)
    per_entity = config.feature(config.item_feature).per_entity_ids
    mismatches = []
    for s in b.samples.itertuples(index=False):
        r = ref.rows[(s.entity, s.line_no)]
        got = (s.split, s.label, s.user_key)
        if got != (r.split, r.label, r.user):
            mismatches.append((s.entity, s.line_no, got, (r.split, r.label, r.user)))
        for other in config.entity_names:
            expected = [items.get((other if per_entity else None, v), 2) for v in r.seqs[other]]
            padded = expected + [0] * (config.seq_len - len(expected))
            seq = list(getattr(s, f"seq_{other}"))
            if seq != padded or getattr(s, f"seq_{other}_len") != len(expected):
                mismatches.append((s.entity, s.line_no, other, seq, padded))
        for name, count in r.activity.items() if config.activity else ():
            bucket = FIRST_INDEX + sum(count >= b for b in ACTIVITY_BOUNDARIES)
            if getattr(s, name) != bucket:
                mismatches.append((s.entity, s.line_no, name, getattr(s, name), count))
    assert not mismatches, mismatches[:5]


def assert_vocab_and_encoding(b: Built, ref: Reference, config: DataConfig) -> None:
    """Vocabularies from train only, indices by count; every feature value encoded per contract."""
    counts = reference_vocab_counts(ref, config)
    lookups = {}
    for name, counter in counts.items():
        rows = b.vocab[b.vocab.feature == name]
        got = {
            (None if e is None else e, v): (int(i), int(c))
            for e, v, i, c in zip(
                rows.entity, rows.raw_value, rows["index"], rows["count"], strict=True
            )
        }
        assert {k: c for k, (_, c) in got.items()} == dict(counter), name
        order = sorted(counter, key=lambda k: (-counter[k], k[0] or "", k[1]))
        assert [got[k][0] for k in order] == list(range(3, 3 + len(order))), name
        lookups[name] = {k: i for k, (i, _) in got.items()}

    schema_features = {f["name"]: f for f in b.schema["features"]}
    wrong = []
    for s in b.samples.itertuples(index=False):
        r = ref.rows[(s.entity, s.line_no)]
        for f in config.features:
            if s.entity not in f.columns:
                expected = 0
            else:
                raw = r.values[f.columns[s.entity]]
                if raw in MISSING:
                    expected = 1
                elif f.kind == "categorical":
                    key = (s.entity if f.per_entity_ids else None, raw)
                    expected = lookups[f.name].get(key, 2)
                else:
                    try:
                        value = float(raw)
                    except ValueError:
                        expected = 2
                    else:
                        boundaries = schema_features[f.name]["boundaries"]
                        expected = 3 + bisect.bisect_right(boundaries, value)
            if getattr(s, f.name) != expected:
                wrong.append((s.entity, s.line_no, f.name, getattr(s, f.name), expected))
    assert not wrong, wrong[:5]

    for f in config.features:
        if f.kind != "bucketized":
            continue
        train_values = [
            float(r.values[f.columns[r.entity]])
            for r in ref.rows.values()
            if r.split == "train"
            and r.entity in f.columns
            and re.fullmatch(r"-?\d+(\.\d*)?", r.values[f.columns[r.entity]])
        ]
        boundaries = schema_features[f.name]["boundaries"]
        # Quantiles of the train values: actual values, increasing, above the minimum.
        assert boundaries == sorted(set(boundaries))
        assert set(boundaries) <= set(train_values)
        assert all(v > min(train_values) for v in boundaries)
        rows = b.vocab[b.vocab.feature == f.name].sort_values("index")
        assert list(rows.raw_value) == [repr(x) for x in [float("-inf"), *boundaries]]
        assert int(rows["count"].sum()) == len(train_values)


def assert_reconciles(b: Built, ref: Reference, config: DataConfig) -> None:
    """input lines = samples + quarantined + removed duplicates, per entity."""
    for entity in config.entity_names:
        s = b.summary["entities"][entity]
        n_samples = int((b.samples.entity == entity).sum())
        n_quarantined = int((b.quarantine.entity == entity).sum())
        assert s["input_lines"] == ref.lines[entity]
        assert (s["samples"], s["quarantined"]) == (n_samples, n_quarantined)
        assert s["duplicates_removed"] == ref.removed[entity]
        assert ref.lines[entity] == n_samples + n_quarantined + ref.removed[entity]
        assert b.schema["counts"][entity] == {
            split: int(((b.samples.entity == entity) & (b.samples.split == split)).sum())
            for split in ("train", "valid", "test")
        }


def assert_schema_describes_samples(b: Built, config: DataConfig) -> None:
    schema = b.schema
    assert schema["source_entity"] == config.source_entity
    assert schema["target_entity"] == config.target_entity
    assert schema["history_mode"] == config.history_mode
    assert schema["seq_len"] == config.seq_len
    assert schema["reserved_indices"] == {"padding": 0, "missing": 1, "oov": 2}
    features = {f["name"]: f for f in schema["features"]}
    activity = [
        activity_feature(c, r) for r in ("own", "other") for c in ("rows", "likes")
    ] * config.activity
    sequences = [f"seq_{e}" for e in config.entity_names]
    expected_names = [f.name for f in config.features] + activity + sequences
    assert [f["name"] for f in schema["features"]] == expected_names
    fixed = ["entity", "split", "line_no", "user_key", "label"]
    seq_columns = [c for e in config.entity_names for c in (f"seq_{e}", f"seq_{e}_len")]
    assert (
        list(b.samples.columns)
        == fixed + [f.name for f in config.features] + activity + seq_columns
    )
    for name in activity:
        entry = features[name]
        assert (entry["group"], entry["kind"]) == ("user", "bucketized")
        assert entry["boundaries"] == [float(x) for x in ACTIVITY_BOUNDARIES]
        assert int(b.samples[name].max()) < entry["vocab_size"]
        assert int(b.samples[name].min()) >= FIRST_INDEX
    for f in config.features:
        entry = features[f.name]
        assert (entry["group"], entry["entity"], entry["kind"]) == (f.group, f.entity, f.kind)
        ids = {config.user_key, *config.id_columns}
        id_in = [e for e in config.entity_names if f.columns.get(e) in ids]
        assert entry.get("integer_id", []) == id_in, f.name
        # The embedding table of vocab_size rows covers every index in the data.
        assert int(b.samples[f.name].max()) < entry["vocab_size"]
        if f.kind == "categorical":
            in_vocab = b.vocab[b.vocab.feature == f.name]["index"]
            assert entry["vocab_size"] == int(in_vocab.max()) + 1
        else:
            assert entry["vocab_size"] == 3 + len(entry["boundaries"]) + 1
    for e in config.entity_names:
        entry = features[f"seq_{e}"]
        assert entry["group"] == "sequence" and entry["entity"] == e
        assert entry["item_feature"] == config.item_feature
        assert entry["seq_len"] == config.seq_len
        assert entry["length_column"] == f"seq_{e}_len"
        assert entry["vocab_size"] == features[config.item_feature]["vocab_size"]
        assert b.samples[f"seq_{e}"].map(len).eq(config.seq_len).all()
        assert max(max(s) for s in b.samples[f"seq_{e}"]) < entry["vocab_size"]


# --------------------------------------------------------------------------------------------
# Tenrec tests.
# --------------------------------------------------------------------------------------------


def test_no_leakage_sequences_match_independent_recomputation(
    built: Built, tenrec_reference: Reference
) -> None:
    config = tenrec_config()
    assert_matches_reference(built, tenrec_reference, config)
    # The fixture exercises truncation and both cross-entity directions.
    assert (built.samples.seq_video_len == config.seq_len).any()
    assert ((built.samples.entity == "article") & (built.samples.seq_video_len > 0)).any()
    assert ((built.samples.entity == "video") & (built.samples.seq_article_len > 0)).any()


def test_frozen_history_is_fixed_across_the_test_block(built: Built) -> None:
    heavy = built.samples[built.samples.user_key == HEAVY_USER]
    for entity in ("video", "article"):
        rows = heavy[heavy.entity == entity]
        test_rows = rows[rows.split == "test"]
        assert len(test_rows) > 1 and test_rows.label.sum() > 0
        # Likes inside the test block never reach a later test row's features.
        assert test_rows[f"seq_{entity}"].map(tuple).nunique() == 1
        # The other entity's test rows all see this entity's train + valid likes; its train
        # and valid rows all see the train likes alone, an older history.
        other = heavy[heavy.entity != entity]
        test_other = other[other.split == "test"][f"seq_{entity}"].map(tuple)
        fit_other = other[other.split != "test"][f"seq_{entity}"].map(tuple)
        assert test_other.nunique() == 1 and fit_other.nunique() == 1
        assert heavy[f"seq_{entity}_len"].max() > 0


# The online build trims rare ids at another threshold than the default config's.
RARE_MIN_COUNT = 2


def online_config_file(directory: Path) -> Path:
    return data_config(TENREC_CONFIG, RARE_MIN_COUNT, directory / "tenrec_rare.yaml")


@pytest.fixture(scope="module")
def built_online(spark, tenrec_raw: RawFixture, tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("out") / "tenrec_online"
    config = online_config_file(out.parent)
    summary = build_samples(
        spark, config, tenrec_raw.dir, out, history_mode="online", seq_len=5, activity=True
    )
    return load_built(out, summary)


def online_config(built_online: Built) -> DataConfig:
    return load_config(online_config_file(built_online.out.parent)).with_overrides(
        history_mode="online", seq_len=5, duplicates=None, activity=True
    )


def test_online_history_matches_independent_recomputation(
    built_online: Built, tenrec_raw: RawFixture
) -> None:
    """The `online` mode (and the command-line overrides) on generated data: every sequence
    recomputed in plain Python, and a test row after a like in the test block carries it."""
    config = online_config(built_online)
    assert (built_online.schema["history_mode"], built_online.schema["seq_len"]) == ("online", 5)
    assert_matches_reference(built_online, reference(tenrec_raw.dir, config), config)
    heavy = built_online.samples[built_online.samples.user_key == HEAVY_USER]
    for entity in ("video", "article"):
        test_rows = heavy[(heavy.entity == entity) & (heavy.split == "test")]
        test_rows = test_rows.sort_values("line_no").reset_index(drop=True)
        first_like = int(test_rows.label.to_numpy().argmax())
        assert test_rows.label[first_like] == 1 and first_like + 1 < len(test_rows)
        liked_item = test_rows[config.item_feature][first_like]
        # The next test row's newest liked item is that like; the frozen mode never shows it.
        assert test_rows[f"seq_{entity}"][first_like + 1][0] == liked_item
        assert test_rows[f"seq_{entity}"].map(tuple).nunique() > 1


def test_rare_ids_are_oov_in_every_split_and_counted(
    built_online: Built, tenrec_raw: RawFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """`min_count` 2: a value on one train row gets no index; its rows, in every split and in
    the liked-item sequences (test above), hold OOV; the summary counts what was folded."""
    config = online_config(built_online)
    ref = reference(tenrec_raw.dir, config)
    assert_vocab_and_encoding(built_online, ref, config)  # vocab = values on >= 2 train rows
    full = reference_vocab_counts(ref, config, trimmed=False)
    expected = {
        f.name: {
            "min_count": RARE_MIN_COUNT,
            "oov_values": sum(1 for n in full[f.name].values() if n < RARE_MIN_COUNT),
            "oov_train_rows": sum(n for n in full[f.name].values() if n < RARE_MIN_COUNT),
        }
        for f in config.features
        if f.kind == "categorical"
    }
    assert built_online.summary["rare_ids"] == expected
    # The data holds rare users and items, or this test would prove nothing.
    assert expected["user_id"]["oov_values"] > 0 and expected["item_id"]["oov_values"] > 0
    rare_users = {int(v) for (_, v), n in full["user_id"].items() if n < RARE_MIN_COUNT}
    samples = built_online.samples
    of_rare = samples[samples.user_key.isin(rare_users)]
    assert (of_rare.user_id == 2).all() and set(of_rare.split) >= {"train", "test"}
    schema_min = {f["name"]: f.get("min_count") for f in built_online.schema["features"]}
    assert schema_min["user_id"] == schema_min["item_id"] == RARE_MIN_COUNT
    assert schema_min["item_score1"] is None  # bucketized: no vocabulary to trim
    with caplog.at_level("INFO", logger="etl"):
        _log_summary(built_online.summary)
    line = f"user_id: {expected['user_id']['oov_values']} values on fewer than 2 train rows"
    assert line in caplog.text


def test_quarantine_and_count_reconciliation(
    built: Built, tenrec_raw: RawFixture, tenrec_reference: Reference
) -> None:
    config = tenrec_config()
    got = {
        (e, int(n)): (line, reason.split(":")[0])
        for e, n, line, reason in zip(
            built.quarantine.entity,
            built.quarantine.line_no,
            built.quarantine.raw_line,
            built.quarantine.reason,
            strict=True,
        )
    }
    assert got == tenrec_reference.bad
    assert {k: kind for k, (_, kind) in got.items()} == tenrec_raw.bad
    assert_reconciles(built, tenrec_reference, config)
    # Generated logs repeat identical lines; keep (the default) keeps them as samples.
    assert built.summary["duplicates"] == "keep"
    assert built.summary["entities"]["video"]["duplicates_found"] > 0


def test_summary_matches_the_tables_and_is_logged(
    built: Built, tenrec_raw: RawFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """The job's closing summary: every count recomputed from the written tables and the raw
    files, and the lines it logs say them."""
    samples = built.samples
    for entity, s in built.summary["entities"].items():
        rows = samples[samples.entity == entity]
        assert s["samples"] == len(rows) and s["users"] == rows.user_key.nunique()
        for split, v in s["splits"].items():
            part = rows[rows.split == split]
            assert (v["rows"], v["users"]) == (len(part), part.user_key.nunique())
            assert v["like_rate"] == pytest.approx(part.label.mean())
        # Duplicates found: good lines identical to an earlier good line of the same file.
        lines = (tenrec_raw.dir / f"QK-{entity}.csv").read_text().rstrip("\n").split("\n")[1:]
        good = [x for n, x in enumerate(lines, start=1) if (entity, n) not in tenrec_raw.bad]
        assert s["duplicates_found"] == len(good) - len(set(good)) > 0
    entities_of = samples.groupby("user_key").entity.agg(lambda e: "+".join(sorted(set(e))))
    assert built.summary["user_overlap"] == entities_of.value_counts().to_dict()

    with caplog.at_level("INFO", logger="etl"):
        _log_summary(built.summary)
    text = caplog.text
    video = built.summary["entities"]["video"]
    assert (
        f"video: {video['input_lines']} input lines = {video['samples']} samples + "
        f"{video['quarantined']} quarantined + 0 removed duplicates" in text
    )
    rate = video["splits"]["train"]["like_rate"]
    assert re.search(rf"train +{video['splits']['train']['rows']} rows, like rate {rate:.4f}", text)
    assert "user overlap" in text and "history mode frozen" in text


def test_writer_choice_without_delta_spark(spark) -> None:
    """No delta-spark jars here: auto falls back to delta-rs, and an explicit request for
    delta-spark is refused with what to add."""
    assert resolve_writer(spark, "auto") == "rs"
    with pytest.raises(WriterError, match=r"--writer spark: .* --packages io\.delta"):
        resolve_writer(spark, "spark")


def test_vocabularies_oov_and_missing(
    built: Built, tenrec_raw: RawFixture, tenrec_reference: Reference
) -> None:
    assert_vocab_and_encoding(built, tenrec_reference, tenrec_config())
    s = built.samples.set_index(["entity", "line_no"])
    video, article = tenrec_raw.heavy_lines["video"], tenrec_raw.heavy_lines["article"]
    assert s.loc[("video", video[0]), "video_category"] == 1  # \N
    assert s.loc[("video", video[1]), "video_category"] == 1  # empty
    last = s.loc[("video", video[-1])]
    assert (last.split, last.video_category, last.item_id) == ("test", 2, 2)  # unseen in train
    assert s.loc[("article", article[-1]), "item_id"] == 2
    assert s.loc[("article", article[1]), "item_score1"] == 2  # not a number
    assert s.loc[("article", article[2]), "category_first"] == 1
    # Specific features of the other entity hold 0.
    assert (s.loc["article", "video_category"] == 0).all()
    assert (s.loc["video", "exposure_count"] == 0).all()
    # item_id is namespaced per entity in one vocabulary; user features are not.
    assert set(built.vocab[built.vocab.feature == "item_id"].entity) == {"video", "article"}
    assert built.vocab[built.vocab.feature == "gender"].entity.isna().all()


def test_schema_file(built: Built) -> None:
    config = tenrec_config()
    assert_schema_describes_samples(built, config)
    assert built.schema["dataset"] == "tenrec-qk"
    assert built.schema["item_feature"] == "item_id"
    assert built.schema["raw_input"]["files"] == {
        "video": "QK-video.csv",
        "article": "QK-article.csv",
    }


def test_delta_tables_readable_by_deltalake_and_ray(built: Built) -> None:
    samples = DeltaTable(str(built.out / "samples"))
    assert samples.metadata().partition_columns == ["entity", "split"]
    arrow = samples.to_pyarrow_table()
    assert arrow.num_rows == len(built.samples)
    assert str(arrow.schema.field("label").type) == "int8"
    assert str(arrow.schema.field("seq_video").type) == "list<element: int64>"

    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        ray.init(num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=False)
    try:
        data = ray.data.read_delta(str(built.out / "samples"))
        assert data.count() == len(built.samples)
        rows = data.filter(lambda r: r["entity"] == "article" and r["line_no"] == 1).take_all()
        assert len(rows) == 1
        expected = built.samples[(built.samples.entity == "article") & (built.samples.line_no == 1)]
        assert list(rows[0]["seq_video"]) == list(expected.seq_video.iloc[0])
        assert ray.data.read_delta(str(built.out / "quarantine")).count() == len(built.quarantine)
    finally:
        if started_here:
            ray.shutdown()


def test_rerun_is_a_new_version_with_the_same_content(
    spark, built: Built, tenrec_raw: RawFixture
) -> None:
    summary = build_samples(spark, TENREC_CONFIG, tenrec_raw.dir, built.out, activity=True)
    again = load_built(built.out, summary)
    assert again.version == built.version + 1
    pd.testing.assert_frame_equal(_comparable(again.samples), _comparable(built.samples))
    pd.testing.assert_frame_equal(
        again.vocab.sort_values(["feature", "index"]).reset_index(drop=True),
        built.vocab.sort_values(["feature", "index"]).reset_index(drop=True),
    )
    # The schema records which table versions it describes; everything else is unchanged.
    versions = {t: v + 1 for t, v in built.schema["table_versions"].items()}
    assert again.schema == {**built.schema, "table_versions": versions}
    old = DeltaTable(str(built.out / "samples"), version=built.version).to_pyarrow_table()
    assert old.num_rows == len(built.samples)
    assert not list(built.out.glob("_staging-*"))
    # The same rows in the same files, logged in the same order: training streams the files in
    # a seeded permutation of the log's order, so a rebuilt table trains as the old one did.
    logged = [
        DeltaTable(str(built.out / "samples"), version=v).file_uris()
        for v in (built.version, again.version)
    ]
    assert len(logged[0]) == len(logged[1]) > 1
    for before, after in zip(*logged, strict=True):
        assert pq.read_table(before).equals(pq.read_table(after))


def _comparable(samples: pd.DataFrame) -> pd.DataFrame:
    out = samples.sort_values(["entity", "line_no"]).reset_index(drop=True)
    for column in out.columns:
        if column.startswith("seq_") and not column.endswith("_len"):
            out[column] = out[column].map(tuple)
    return out


# --------------------------------------------------------------------------------------------
# Bad input fails at once and writes nothing.
# --------------------------------------------------------------------------------------------


def _copy_raw(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for name in ("QK-video.csv", "QK-article.csv"):
        shutil.copy(src / name, dst / name)
    return dst


def test_missing_file_fails_before_writing(
    spark, built: Built, tenrec_raw: RawFixture, tmp_path: Path
) -> None:
    raw = _copy_raw(tenrec_raw.dir, tmp_path / "raw")
    (raw / "QK-article.csv").unlink()
    out = tmp_path / "out"
    with pytest.raises(
        InputError, match=r"^entities\.article\.file: raw file not found: .*QK-article\.csv"
    ):
        build_samples(spark, TENREC_CONFIG, raw, out)
    assert not out.exists()
    # Over an existing output, too, nothing is touched: same table versions, same schema file.
    # (A copy: a regression here must not damage the output the other tests read.)
    existing = shutil.copytree(built.out, tmp_path / "existing")
    schema_before = (existing / "feature_schema.json").read_text()
    versions = {t: DeltaTable(str(existing / t)).version() for t in ("samples", "vocab")}
    with pytest.raises(InputError, match="raw file not found"):
        build_samples(spark, TENREC_CONFIG, raw, existing)
    assert (existing / "feature_schema.json").read_text() == schema_before
    assert {t: DeltaTable(str(existing / t)).version() for t in versions} == versions
    assert not list(existing.glob("_staging-*"))


def test_missing_column_fails_at_once_from_spark_submit(
    tenrec_raw: RawFixture, tmp_path: Path
) -> None:
    raw = _copy_raw(tenrec_raw.dir, tmp_path / "raw")
    article = raw / "QK-article.csv"
    header, rest = article.read_text().split("\n", 1)
    article.write_text(header.replace("item_score1", "item_scoreX") + "\n" + rest)
    out = tmp_path / "out"
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "spark-submit"),
            "--master",
            "local[1]",
            str(REPO / "etl" / "build_samples.py"),
            "--config",
            str(TENREC_CONFIG),
            "--input",
            str(raw),
            "--output",
            str(out),
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"},
        timeout=180,
        check=False,
    )
    # spark-submit forwards the script's stderr to its own stdout.
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == [
        "error: features.specific.article.item_score1: column 'item_score1' not in "
        "QK-article.csv header"
    ]
    assert "Traceback" not in output
    assert not out.exists()


# --------------------------------------------------------------------------------------------
# The same machinery on another entity pair: products (price) and posts (content style).
# --------------------------------------------------------------------------------------------

SHOP_CONFIG = """
name: shop-demo
entities:
  product: {file: product.csv, role: source}
  post: {file: post.csv, role: target}
user_key: user_id
label: click
id_columns: [user_id, item_id]
leaky_columns: [order_placed, dwell_ms]
features:
  user:
    user_id:
    city:
  shared:
    item_id: {per_entity_ids: true}
    creator_id: {source: {product: seller_id, post: author_id}}
  specific:
    product:
      price: {kind: bucketized, buckets: 4}
      brand:
    post:
      content_style:
      word_count: {kind: bucketized, buckets: 3}
sequence: {item_feature: item_id, seq_len: 4, history_mode: online}
split: {test_fraction: 0.25, valid_fraction: 0.2}
duplicates: drop
"""
PRODUCT_HEADER = "user_id,item_id,city,seller_id,price,brand,click,order_placed"
POST_HEADER = "item_id,user_id,author_id,city,content_style,word_count,dwell_ms,click"  # reordered


def _write_shop(raw: Path) -> None:
    rng = random.Random(3)
    product, post = [PRODUCT_HEADER], [POST_HEADER]
    for user in range(40):
        city = rng.choice(["bj", "sh", "gz", "\\N"])
        for _ in range(rng.randint(1, 20)):
            click = int(rng.random() < 0.3)
            product.append(
                f"{user},{rng.randint(1, 25)},{city},{rng.randint(1, 8)},"
                f"{rng.choice(['', f'{rng.uniform(1, 500):.2f}'])},{rng.choice('abcde')},"
                f"{click},{click * int(rng.random() < 0.5)}"
            )
        for _ in range(rng.randint(0, 12)):
            click = int(rng.random() < 0.2)
            post.append(
                f"{rng.randint(1, 15)},{user},{rng.randint(1, 8)},{city},"
                f"{rng.choice(['video', 'photo', 'text'])},{rng.randint(10, 2000)},"
                f"{click * rng.randint(1, 9000)},{click}"
            )
    # Exact duplicate lines: dropped by this config's `duplicates: drop`.
    product.insert(5, product[4])
    post.insert(9, post[8])
    post.insert(10, post[8])
    (raw / "product.csv").write_text("\n".join(product) + "\n")
    (raw / "post.csv").write_text("\n".join(post) + "\n")


@pytest.fixture(scope="module")
def shop(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("shop")
    raw = root / "raw"
    raw.mkdir()
    _write_shop(raw)
    config = root / "shop.yaml"
    config.write_text(SHOP_CONFIG)
    return config, raw, root / "out"


def test_second_entity_pair(spark, shop: tuple[Path, Path, Path]) -> None:
    config_path, raw, out = shop
    summary = build_samples(spark, config_path, raw, out)
    config = load_config(config_path)
    b = load_built(out, summary)
    ref = reference(raw, config)

    assert summary["history_mode"] == "online" and b.schema["history_mode"] == "online"
    assert ref.removed["product"] >= 1 and ref.removed["post"] >= 2
    assert len(b.quarantine) == 0
    assert_reconciles(b, ref, config)
    assert_matches_reference(b, ref, config)
    # Online mode is exercised: some test row's history holds a like from the test block.
    first_test_like: dict[tuple[str, int], int] = {}
    for r in sorted(ref.rows.values(), key=lambda r: r.line_no):
        if r.split == "test" and r.label:
            first_test_like.setdefault((r.entity, r.user), r.line_no)
    assert any(
        r.split == "test" and r.line_no > first_test_like.get((r.entity, r.user), math.inf)
        for r in ref.rows.values()
    )
    assert_vocab_and_encoding(b, ref, config)
    assert_schema_describes_samples(b, config)
    features = {f["name"]: f for f in b.schema["features"]}
    assert (features["price"]["entity"], features["content_style"]["entity"]) == ("product", "post")
    assert features["creator_id"]["group"] == "shared"
    assert (b.samples.loc[b.samples.entity == "post", "price"] == 0).all()
    assert (b.samples.loc[b.samples.entity == "product", "content_style"] == 0).all()
    # creator_id reads seller_id for products and author_id for posts, into one id space.
    assert b.vocab[b.vocab.feature == "creator_id"].entity.isna().all()
    assert set(b.samples.entity) == {"product", "post"}
    assert summary["user_overlap"]  # users by the entities they appear in


# --------------------------------------------------------------------------------------------
# The samples files (files_per_partition) and the delta-rs commit of files Spark wrote.
# --------------------------------------------------------------------------------------------


def _add_actions(table: Path, version: int | None = None) -> pd.DataFrame:
    actions = DeltaTable(str(table), version=version).get_add_actions(flatten=True)
    return pa.table(actions).to_pandas()


def test_samples_files_mix_users_in_a_fixed_order(spark, built: Built) -> None:
    """Each (entity, split) partition is several files; a user's rows of a partition are all in
    one file; inside a file the rows follow the seeded hash order, not the users."""
    config = tenrec_config()
    actions = _add_actions(built.out / "samples", built.version)
    assert actions.path.str.fullmatch(
        r"run-[0-9a-f]{12}/entity=\w+/split=\w+/part-.*\.parquet"
    ).all()
    # The order, in Spark's own terms: the top bits of xxhash64(seed, user_key, line_no), as
    # many as a sort key of the 6 (entity, split) partitions leaves (etl/samples_pass.py).
    bits = 63 - (len(config.entity_names) * 3).bit_length()
    row_hash = F.xxhash64(F.lit(ROW_ORDER_SEED), "user_key", "line_no")
    order_key = F.shiftrightunsigned(row_hash, 64 - bits)
    for (entity, split), files in actions.groupby(["partition.entity", "partition.split"]):
        assert 1 < len(files) <= config.files_per_partition, (entity, split)
        owner: dict[int, str] = {}
        for path, records in zip(files.path, files.num_records, strict=True):
            rows = pq.read_table(built.out / "samples" / path, columns=["user_key", "line_no"])
            assert rows.num_rows == records  # the statistics the commit read from the footer
            for user in set(rows.column("user_key").to_pylist()):
                assert owner.setdefault(user, path) == path, (entity, split, user)
            frame = rows.to_pandas().assign(entity=entity, split=split)
            keys = (
                spark.createDataFrame(frame.reset_index())
                .select("index", order_key.alias("key"))
                .toPandas()
                .sort_values("index")
                .key
            )
            assert keys.is_monotonic_increasing, path
            # Not one block per user, as when rows are written user by user.
            users = frame.user_key.to_numpy()
            if len(users) > 20 and len(set(users)) > 1:
                assert 1 + (users[1:] != users[:-1]).sum() > len(set(users)), path


def test_uncommitted_run_files_are_removed_committed_ones_kept(
    spark, built: Built, tmp_path: Path
) -> None:
    """What a run killed between writing its files and committing them leaves under a table is
    deleted by the next run (`_discard_run`); the files of committed versions stay."""
    out = shutil.copytree(built.out, tmp_path / "out")
    committed = sorted(p.name for p in (out / "samples").glob("run-*"))
    interrupted = "0123456789ab"
    for table in ("samples", "vocab"):
        target = out / table / f"run-{interrupted}"
        shutil.copytree(out / table / committed[0], target)
    (out / f"_staging-{interrupted}").mkdir()
    before = DeltaTable(str(out / "samples")).to_pyarrow_table().num_rows
    _discard_run(HadoopFs(spark), str(out), interrupted)
    assert not list(out.glob(f"*/run-{interrupted}")) and not list(out.glob("_staging-*"))
    assert sorted(p.name for p in (out / "samples").glob("run-*")) == committed
    assert DeltaTable(str(out / "samples")).to_pyarrow_table().num_rows == before
    # The last run, killed after committing, keeps its files, staging dir left behind or not.
    (latest,) = {path.split("/")[0] for path in _add_actions(out / "samples").path}
    (out / f"_staging-{latest[4:]}").mkdir()
    _discard_run(HadoopFs(spark), str(out), latest[4:])
    assert sorted(p.name for p in (out / "samples").glob("run-*")) == committed
    assert DeltaTable(str(out / "samples")).to_pyarrow_table().num_rows == before


def test_schema_counts_and_likes_per_entity_and_split(built: Built) -> None:
    """`counts` and `likes` of the schema file are the samples' rows and liked rows."""
    samples = built.samples
    for entity in ("video", "article"):
        for split in ("train", "valid", "test"):
            part = samples[(samples.entity == entity) & (samples.split == split)]
            assert built.schema["counts"][entity][split] == len(part)
            assert built.schema["likes"][entity][split] == int(part.label.sum())
            assert built.summary["entities"][entity]["splits"][split]["likes"] == part.label.sum()
    assert built.schema["likes"]["article"]["train"] > 0
