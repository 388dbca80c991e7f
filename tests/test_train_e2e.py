"""The whole pipeline: generator -> Spark samples -> train/run.py with two Ray workers and both
MKT stages (the session's `mkt_run`, tests/conftest.py, whose console and MLflow store
tests/test_console.py checks) -> predictions that trace back to raw lines -> train/export.py on
that RUN_DIR -> a serving artifact that scores the test rows as the run's predictions."""

from __future__ import annotations

import csv
import json
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from deltalake import DeltaTable
from safetensors.torch import load_file
from tensorboardX.proto.event_pb2 import Event

from jobs.generate_tenrec import VIDEO
from mkt.schema import FeatureSchema

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def tensorboard_scalars(path: Path) -> dict[str, list[float]]:
    """Scalars of a TensorBoard event file by tag, in step order: TFRecords (length, its CRC,
    the serialized Event, its CRC) read with tensorboardX's Event message."""
    data, at, scalars = path.read_bytes(), 0, {}
    while at < len(data):
        (length,) = struct.unpack("<Q", data[at : at + 8])
        event = Event.FromString(data[at + 12 : at + 12 + length])
        at += 12 + length + 4
        for value in event.summary.value:
            scalars.setdefault(value.tag, []).append(value.simple_value)
    return scalars


def test_generated_data_through_spark_and_both_stages(
    mkt_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    # 1,200 users, both stages on 2 workers, 2 epochs of batch 256, lr 0.005, early stopping on
    # AUC, no embedding L2, sparse embeddings (the command: tests/conftest.py, `mkt_run`).
    raw, out, run_dir, done = mkt_run["raw"], mkt_run["samples"], mkt_run["dir"], mkt_run["done"]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "| mkt |" in done.stdout  # the summary table is printed

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert [s["name"] for s in metrics["stages"]] == ["mem", "tem_alone", "tem"]
    mem, alone, tem = metrics["stages"]
    assert mem["epochs_run"] >= 1 and alone["epochs_run"] >= 1 and tem["epochs_run"] >= 1
    assert metrics["num_workers"] == 2 and metrics["ray_nodes"] == ["127.0.0.1"]
    # Results say which test histories they were scored with (docs/etl.md).
    assert (metrics["history_mode"], metrics["seq_len"]) == ("frozen", 20)
    assert "test histories `frozen`" in (run_dir / "summary.md").read_text()
    for name in ("config.yaml", "summary.md", "curves.png"):
        assert (run_dir / name).stat().st_size > 0, name
    # Everything that ran is recorded: each stage's parameters with their defaults, the
    # training settings and the code commit.
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    assert config["code_commit"] == metrics["code_commit"] == head
    assert config["params"]["mem"]["gamma"] == 0.01 == mem["params"]["gamma"]
    assert config["params"]["tem"]["embeddings"] == tem["params"]["embeddings"] == "frozen_mem"
    assert metrics["train"]["embedding_l2"] == config["train"]["embedding_l2"] == 0
    # The TEM trained on the held-out share of the target train rows, the MEM and TEM alone on
    # the rest.
    counts = json.loads((out / "feature_schema.json").read_text())["counts"]
    share = config["train"]["tem_holdout"]
    tem_rows = tem["history"][0]["train_rows"]
    assert tem_rows == pytest.approx(share * counts["article"]["train"], rel=0.15)
    mem_rows = mem["history"][0]["train_rows"] - counts[VIDEO]["train"]
    assert mem_rows == pytest.approx((1 - share) * counts["article"]["train"], rel=0.15)
    # The same rows, up to one a worker that an equal split of each entity's rows leaves out.
    assert alone["history"][0]["train_rows"] == pytest.approx(mem_rows, abs=2)
    # Each epoch either beat the best so far or went back to it (the plateau rule), and a stage
    # reports the validation numbers of the epoch whose weights it kept.
    rule_on = metrics["train"]["early_stopping"]["plateau_lr_factor"] < 1
    for stage in metrics["stages"]:
        scores = [h["score"] for h in stage["history"]]
        for i, record in enumerate(stage["history"]):
            if stage["start"] is None:  # a start's score (epoch 0) is outside the history
                improved = all(scores[i] > s for s in scores[:i])
                assert ("restored_epoch" in record) == (rule_on and not improved), stage["name"]
        if stage["best_epoch"] > 0:
            kept = stage["history"][stage["best_epoch"] - 1]
            assert stage["best_valid"]["valid_auc"] == pytest.approx(kept["valid_auc"])
    # Progress while it runs: one line per epoch with rows, rows/s, loss and validation metric.
    output = done.stdout + done.stderr
    for stage in ("mem", "tem_alone", "tem"):
        assert re.search(
            rf"\[{stage}\] epoch 1/2: \d+ rows, [\d,]+ rows/s, loss [\d.]+, valid auc [\d.]+",
            output,
        ), stage
    # A stage built on trained ones is scored before its first epoch from each of its starts,
    # the best a candidate for early stopping (train/loop.py); the others are not.
    start = re.search(
        r"\[tem\] before epoch 1: valid auc ([\d.]+) gauc [\d.]+ \(start: (\w+); valid auc of "
        r"each start: mean ([\d.]+), mem ([\d.]+), tem_alone ([\d.]+)\)",
        output,
    )
    assert start, output[-3000:]
    each = dict(zip(("mean", "mem", "tem_alone"), map(float, start.groups()[2:]), strict=True))
    assert float(start[1]) == max(each.values()) == each[start[2]]
    assert (mem["start"], alone["start"], tem["start"]) == (None, None, start[2])  # recorded
    assert "[mem] before epoch 1" not in output and "[tem_alone] before epoch 1" not in output
    # TensorBoard (written by the first worker) holds each epoch's validation AUC and loss.
    events = list((run_dir / "tensorboard" / "tem").glob("events.out.tfevents.*"))
    assert len(events) == 1
    logged = tensorboard_scalars(events[0])
    assert logged["valid_auc"] == pytest.approx([h["valid_auc"] for h in tem["history"]], abs=1e-6)
    assert logged["train_loss"] == pytest.approx([h["train_loss"] for h in tem["history"]])

    # Stage 2 ran on the stage-1 MEM from its best checkpoint, and left it untouched: every MEM
    # tensor TEM holds (its `knowledge.` part, the target path only) equals the checkpoint's.
    # Names differ: the target's HFA, TKE and tower sit under `hfa.<target>`, `extractors.<target>`
    # and `towers.<target>` in MEM and `hfa`, `extractor`, `tower` in TEM, and the CKE keeps only
    # the target gate, renumbered 0.
    schema = FeatureSchema.load(out / "feature_schema.json")

    def optimizer_state(stage: dict) -> dict:
        path = Path(stage["best_checkpoint"]) / "optimizer.pt"
        return torch.load(path, weights_only=True)

    assert set(optimizer_state(mem)) == {"dense", "tables"}  # Adam beside RowAdam
    # TEM reads the frozen MEM's tables: none of its own to train, so one Adam.
    assert "param_groups" in optimizer_state(tem)
    mem_weights = load_file(str(Path(mem["best_checkpoint"]) / "model.safetensors"))
    alone_weights = load_file(str(Path(alone["best_checkpoint"]) / "model.safetensors"))
    tem_weights = load_file(str(Path(tem["best_checkpoint"]) / "model.safetensors"))
    # TEM alone, frozen inside the TEM, is its own stage's best checkpoint, untouched.
    held = {
        k.removeprefix("tem_alone."): v
        for k, v in tem_weights.items()
        if k.startswith("tem_alone.")
    }
    assert held.keys() == alone_weights.keys()
    assert all(torch.equal(alone_weights[k], v) for k, v in held.items())
    knowledge = {
        k.removeprefix("knowledge."): v
        for k, v in tem_weights.items()
        if k.startswith("knowledge.")
    }
    # `frozen_mem`: TEM's own path reads the MEM's tables themselves, one tensor that the
    # checkpoint stores once, under either name.
    knowledge |= {k: v for k, v in tem_weights.items() if k.startswith("inputs.embeddings.")}

    def in_mem(key: str) -> str:
        per_entity = (
            ("hfa", "hfa"),
            ("extractor", "extractors"),
            ("tower", "towers"),
            ("entity_user", "entity_user"),
            ("interest", "interest"),
        )
        for part, modules in per_entity:
            if key.startswith(f"{part}."):
                return f"{modules}.{schema.target_entity}.{key.removeprefix(part + '.')}"
        return key.replace("cke.gates.0.", f"cke.gates.{schema.target_index}.")

    assert "inputs.embeddings.tables.user_id.weight" in knowledge
    assert any(k.startswith("cke.gates.") for k in knowledge)
    for key, value in knowledge.items():
        assert torch.equal(mem_weights[in_mem(key)], value), key

    # One prediction per target test row, each naming its raw line.
    schema = json.loads((out / "feature_schema.json").read_text())
    target = schema["target_entity"]
    predictions = DeltaTable(str(run_dir / "predictions")).to_pandas()
    assert set(predictions["entity"]) == {target}
    assert predictions["line_no"].is_unique
    assert len(predictions) == schema["counts"][target]["test"]
    assert predictions["score"].between(0, 1).all()
    raw_file = raw / schema["raw_input"]["files"][target]
    with raw_file.open(newline="") as f:
        lines = list(csv.DictReader(f))  # line_no 1 = the first data line
    raw_like = np.array([int(lines[n - 1]["like"]) for n in predictions["line_no"]])
    raw_user = np.array([int(lines[n - 1]["user_id"]) for n in predictions["line_no"]])
    assert (raw_like == predictions["label"].to_numpy()).all()
    assert (raw_user == predictions["user_key"].to_numpy()).all()

    test = metrics["test"]
    assert test["model"]["rows"] == len(predictions)
    assert test["model"]["auc"] > 0.6, test["model"]
    assert test["oracle"]["auc"] > test["model"]["auc"]  # the generator's truth ranks best
    assert test["like_rate"]["rows"] == len(predictions)  # the floor, on the same rows
    assert 0.5 < test["like_rate"]["auc"] < test["oracle"]["auc"]
    assert 0 < test["model"]["gauc_coverage"] <= 1
    assert sum(g["rows"] for g in test["model"]["by_activity"].values()) == len(predictions)

    # The run, exported by the export command, serves the same scores: the artifact on the
    # target test rows of the samples table equals the run's `predictions`, row by row.
    from mkt.serving import Artifact
    from train.export import main as export_main

    artifact_dir = tmp_path / "artifact"
    capsys.readouterr()
    assert export_main(["--run", str(run_dir), "--output", str(artifact_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    weights = printed["files"]["model/weights.safetensors"]
    assert printed["total_bytes"] > weights >= 4 * printed["tensor_elements"] > 0
    artifact = Artifact.load(artifact_dir)
    assert artifact.manifest["run"]["run_dir"] == str(run_dir.resolve())
    rows = DeltaTable(str(out / "samples")).to_pyarrow_table(
        filters=[("entity", "=", target), ("split", "=", "test")]
    )
    result = artifact.score_samples(rows)
    assert result.errors == {}
    served = rows.select(["entity", "line_no"]).to_pandas().assign(served=result.scores)
    joined = predictions.merge(served, on=["entity", "line_no"], validate="one_to_one")
    assert len(joined) == len(predictions) == rows.num_rows
    assert np.abs(joined["served"] - joined["score"]).max() < 1e-5
