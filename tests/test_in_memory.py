"""jobs/in_memory.py on the ETL's samples of 400 generated users: MKT's two stages and TEM
alone train in one process, the same seed gives the same numbers (whatever the order of the
table's rows in its files), the MEM can be held to the
target rows, and --compare pairs two output directories' test scores."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from deltalake import DeltaTable, write_deltalake
from sklearn.metrics import roc_auc_score

# The in-memory tables' evaluation starts an embedded Ray: bound to 127.0.0.1 only if this is
# set before Ray is first imported (jobs.in_memory imports it).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

from jobs.in_memory import Samples, main, without_features
from mkt.schema import load_samples_dir, samples_table

OVERRIDES = ["train.epochs=2", "train.batch_size=256", "train.embedding_l2=0"]
DROPPED = ["gender", "age"]


def reordered_copy(samples: Path, directory: Path) -> Path:
    """The same samples with the table's rows written in reverse order (as a rebuild may
    order them otherwise), same partitions."""
    shutil.copytree(samples, directory)
    table = samples_table(directory)
    rows = DeltaTable(str(table)).to_pyarrow_table()
    partitions = DeltaTable(str(table)).metadata().partition_columns
    shutil.rmtree(table)
    write_deltalake(
        str(table), rows.take(list(range(rows.num_rows))[::-1]), partition_by=partitions or None
    )
    return directory


@pytest.fixture(scope="module")
def runs(generated_samples: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("in_memory")
    out = {"mkt": root / "mkt", "again": root / "again", "target": root / "target"}
    # "again": the same seed on the same rows in another file order.
    reordered = reordered_copy(generated_samples, root / "reordered")
    for name, samples, extra in (
        ("mkt", generated_samples, []),
        ("again", reordered, []),
        ("target", generated_samples, ["--mem-rows", "target"]),
    ):
        args = ["--samples", str(samples), "--output", str(out[name]), *extra]
        assert main([*args, *OVERRIDES]) == 0
    out["tem_only"] = root / "tem_only"
    args = ["--samples", str(generated_samples), "--output", str(out["tem_only"])]
    assert main([*args, *OVERRIDES, "--model", "tem_only", "--seeds", "0", "1"]) == 0
    out["patience"] = root / "patience"
    args = ["--samples", str(generated_samples), "--output", str(out["patience"])]
    early = ["train.epochs=6", "train.early_stopping.patience=2"]
    assert main([*args, *OVERRIDES, *early, "--model", "tem_only"]) == 0
    out["dropped"] = root / "dropped"
    args = ["--samples", str(generated_samples), "--output", str(out["dropped"])]
    assert main([*args, *OVERRIDES, "--model", "tem_only", "--drop-features", *DROPPED]) == 0
    out["finetune"] = root / "finetune"
    args = ["--samples", str(generated_samples), "--output", str(out["finetune"])]
    assert main([*args, *OVERRIDES, "train.epochs=1", "--model", "finetune"]) == 0
    return out


def test_mkt_stages_are_deterministic_and_recorded(runs):
    first = json.loads((runs["mkt"] / "seed0.json").read_text())
    again = json.loads((runs["again"] / "seed0.json").read_text())
    for stage in ("mem", "tem_alone", "tem"):
        assert [h["valid"] for h in first[stage]["history"]] == [
            h["valid"] for h in again[stage]["history"]
        ]
        assert len(first[stage]["history"]) == 2
    assert 1 <= first["mem"]["best_epoch"] <= 2 and 1 <= first["tem_alone"]["best_epoch"] <= 2
    # The TEM starts from its MEM's logit, TEM alone's or their mean, whichever validates
    # best, and that start ("epoch 0") is a candidate too: it never ends below either.
    assert first["tem"]["start"] in ("mean", "mem", "tem_alone")
    assert 0 <= first["tem"]["best_epoch"] <= 2
    for earlier in ("mem", "tem_alone"):
        assert first["tem"]["best"]["valid"]["auc"] >= first[earlier]["best"]["valid"]["auc"]
    assert set(first["mem"]["train_rows"]) == {"video", "article"}
    assert set(first["tem"]["train_rows"]) == {"article"}
    # MEM and TEM split the target train rows by train.tem_holdout; TEM alone has the MEM's.
    assert first["tem_alone"]["train_rows"] == {"article": first["mem"]["train_rows"]["article"]}
    held = first["tem"]["train_rows"]["article"]
    pretrain = first["mem"]["train_rows"]["article"]
    share = first["config"]["train"]["tem_holdout"]
    assert 0 < share < 1 and abs(held / (held + pretrain) - share) < 0.05
    assert first["config"]["params"]["mem"]["gamma"] == 0.01  # resolved defaults recorded
    np.testing.assert_array_equal(
        np.load(runs["mkt"] / "seed0.npz")["scores"], np.load(runs["again"] / "seed0.npz")["scores"]
    )


def test_early_stopping_as_the_runner(runs):
    tem = json.loads((runs["patience"] / "seed0.json").read_text())["tem"]
    scores = [h["valid"]["auc"] for h in tem["history"]]
    best = tem["best_epoch"]
    assert scores[best - 1] == max(scores)
    # It ran every epoch, or stopped two epochs (the patience) after the best.
    assert len(scores) == 6 or len(scores) == best + 2
    # Each epoch that did not beat the best so far went back to it (plateau_lr_factor).
    plateaus = 0
    for epoch, record in enumerate(tem["history"], start=1):
        so_far = max(range(1, epoch), key=lambda e: scores[e - 1], default=None)
        if so_far is not None and scores[epoch - 1] <= scores[so_far - 1]:
            plateaus += 1
            assert record["restored_epoch"] == so_far
        else:
            assert "restored_epoch" not in record
    assert plateaus >= 1
    # The scores kept are the best epoch's, whatever came after it.
    kept = np.load(runs["patience"] / "seed0.npz")
    assert roc_auc_score(kept["labels"], kept["scores"]) == pytest.approx(
        tem["best"]["test"]["auc"]
    )


def test_each_stage_trains_and_is_chosen_on_its_own_rows(runs):
    finetune = json.loads((runs["finetune"] / "seed0.json").read_text())
    # The source pre-training trains and validates on the source alone, as train/stage.py.
    assert set(finetune["pretrain"]["train_rows"]) == {"video"}
    assert finetune["pretrain"]["scored_entity"] == "video"
    assert set(finetune["finetune"]["train_rows"]) == {"article"}
    assert finetune["finetune"]["scored_entity"] == "article"
    assert not (runs["finetune"] / "stages").exists()  # a source model scores no target row
    # MKT's MEM scores the target: its test scores are kept beside the run's (the TEM's).
    mkt = json.loads((runs["mkt"] / "seed0.json").read_text())
    mem = np.load(runs["mkt"] / "stages" / "mem" / "seed0.npz")
    tem = np.load(runs["mkt"] / "seed0.npz")
    np.testing.assert_array_equal(mem["labels"], tem["labels"])
    # A TEM that kept its start from the MEM scores as its MEM (its own terms start at 0).
    kept_mem = mkt["tem"]["best_epoch"] == 0 and mkt["tem"]["start"] == "mem"
    assert np.array_equal(mem["scores"], tem["scores"]) == kept_mem
    assert mkt["mem"]["best"]["test"]["auc"] == pytest.approx(
        roc_auc_score(mem["labels"], mem["scores"])
    )


def test_mem_rows_target_drops_the_source(runs):
    target = json.loads((runs["target"] / "seed0.json").read_text())
    assert set(target["mem"]["train_rows"]) == {"article"}
    assert target["mem_rows"] == "target"


def test_compare_pairs_seed_means(runs, capsys, tmp_path):
    compared = [str(runs["tem_only"]), str(runs["mkt"]), str(runs["target"])]
    assert main(["--compare", *compared, "--plot", str(tmp_path / "compare.png")]) == 0
    assert (tmp_path / "compare.png").stat().st_size > 0
    printed = capsys.readouterr().out
    lines = [line for line in printed.splitlines() if line.startswith("| ")]
    assert lines[0].startswith("| run | seeds | valid AUC | test AUC | test GAUC | tem_only - run")
    tem_only = [json.loads((runs["tem_only"] / f"seed{k}.json").read_text()) for k in (0, 1)]
    valid = np.mean([r["tem"]["best"]["valid"]["auc"] for r in tem_only])
    assert lines[1].split(" | ")[2] == f"{valid:.4f}"
    assert [line.split(" | ")[:2] for line in lines[1:]] == [
        ["| tem_only", "2"],
        ["| mkt", "1"],
        ["| target", "1"],
    ]
    # The base's row has no gain; each other's has an interval around its difference.
    assert lines[1].rstrip().endswith("|  |  |")
    low, high = re.search(r"\[([-+.\d]+), ([-+.\d]+)\]", lines[2]).groups()
    assert float(low) <= float(high)
    with pytest.raises(SystemExit, match="no seed"):
        main(["--compare", str(runs["tem_only"]), str(runs["mkt"].parent / "missing")])


def test_drop_features_trains_without_them(generated_samples, runs):
    """--drop-features: the model is built and fed without the named features, the run
    records them, and an unknown name is refused."""
    schema = load_samples_dir(generated_samples)
    dropped = DROPPED
    assert all(name in {f.name for f in schema.features} for name in dropped)
    reduced = without_features(schema, dropped)
    assert {f.name for f in schema.features} - {f.name for f in reduced.features} == set(dropped)
    samples = Samples(generated_samples, reduced)
    assert not set(dropped) & set(samples.table.column_names)
    batch = samples.rows(schema.target_entity, "train")
    assert not set(dropped) & set(batch)
    result = json.loads((runs["dropped"] / "seed0.json").read_text())
    assert result["dropped_features"] == dropped
    assert result["tem"]["best"]["valid"]["auc"] > 0
    with pytest.raises(SystemExit, match="not_a_feature"):
        without_features(schema, ["not_a_feature"])


def test_tables_in_memory_score_and_evaluate_as_the_runner(generated_samples, runs, tmp_path):
    """jobs/reproduce_tables.py --in-memory: each run trains as jobs/in_memory.py does (the
    same seed and config give its scores), writes the runner's predictions table for every
    target test row, and is evaluated by the runner's code (activity groups, like-rate floor)."""
    from deltalake import DeltaTable

    from jobs import reproduce_tables

    args = ["--quick", "--in-memory", "--samples", str(generated_samples), "--seeds", "0"]
    args += ["--output", str(tmp_path), "--models", "mkt", "wo_mem"]
    args += ["--config", str(reproduce_tables.REPO_ROOT / "conf" / "run" / "quickstart.yaml")]
    summary = reproduce_tables.main([*args, *OVERRIDES])
    assert summary["trainer"] == "in_memory"
    run_dir = tmp_path / "runs" / "mkt" / "seed0"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["trainer"] == "in_memory" and metrics["seed"] == 0
    predictions = DeltaTable(str(run_dir / "predictions")).to_pandas().set_index("line_no")
    by_hand = np.load(runs["mkt"] / "seed0.npz")
    samples = Samples(generated_samples, load_samples_dir(generated_samples))
    lines = samples.partition(samples.schema.target_entity, "test")["line_no"].to_numpy()
    assert len(predictions) == len(lines) and predictions.index.is_unique
    predictions = predictions.loc[lines]
    np.testing.assert_array_equal(predictions["label"].to_numpy(), by_hand["labels"])
    np.testing.assert_allclose(predictions["score"].to_numpy(), by_hand["scores"])
    test = metrics["test"]
    assert test["model"]["auc"] == pytest.approx(
        roc_auc_score(by_hand["labels"], by_hand["scores"])
    )
    assert set(test) >= {"model", "like_rate"} and test["model"]["by_activity"]
    table = {row["key"]: row for row in summary["table2"]}
    assert table["mkt"]["auc_mean"] == pytest.approx(test["model"]["auc"])
    assert [row["key"] for row in summary["gains"]] == ["wo_mem"]


def test_a_stage_built_on_a_trained_one_keeps_its_start(generated_samples):
    """A TEM trained to invert the labels of the rows it is validated on gets worse every
    epoch: with `score_start` early stopping keeps the untrained TEM (epoch 0, its MEM's
    prediction), without it the least bad epoch."""
    import torch

    from jobs.in_memory import metrics, train_stage
    from mkt.models import build_model
    from train.checks import resolved_config
    from train.config import load_run_config

    schema = load_samples_dir(generated_samples)
    samples = Samples(generated_samples, schema)
    overrides = ["train.epochs=2", "train.lr=0.01", "train.early_stopping.metric=auc"]
    config = resolved_config(load_run_config(None, overrides))
    config["schema_user_key"] = schema.columns["user_key"]
    valid = samples.rows(schema.target_entity, "valid")
    inverted = {**valid, "label": 1.0 - valid["label"]}
    user_key = config["schema_user_key"]
    kept = {}
    for score_start in (True, False):
        torch.manual_seed(0)
        mem = build_model("mem", schema, {})
        start = metrics(mem, valid, user_key)
        tem = build_model("tem", schema, {}, pretrained=mem)
        result = train_stage(
            tem,
            {schema.target_entity: inverted},
            {"valid": valid},
            config,
            0,
            "tem",
            score_start=score_start,
        )
        kept[score_start] = (result, start, metrics(tem, valid, user_key))
    result, start, final = kept[True]
    assert result["best_epoch"] == 0 and len(result["history"]) == 2
    assert result["best"]["valid"] == final
    assert final == pytest.approx(start)
    result, start, final = kept[False]
    assert result["best_epoch"] >= 1 and final["auc"] < start["auc"]
