"""One train/run.py run of the quick start's config (two stages, two workers) on generated data,
with MLflow tracking into a `file://` store (the session's `mkt_run`, tests/conftest.py, whose
outputs tests/test_train_e2e.py checks): its console holds only the lines docs/training.md
("Console output") lists, the store holds the run, both stages' runs, their parameters,
per-epoch and test metrics and curves.png, and the docs' `mlflow ui` on 127.0.0.1 serves them.
(That run has no embedding L2; the L2 counting line's form is checked on test_train_ray.py's
runs, which have one.)"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
import yaml
from test_train_ray import _free_port, _wait_for_dashboard

from train.config import flatten
from train.tracking import PARENT_TAG

pytestmark = pytest.mark.slow

COLOUR = re.compile(r"\x1b\[[0-9;]*m")
# Ray's prefix on a worker's lines, and its suffix on lines several workers printed alike.
PREFIX = r"(?:\(\S+ pid=\d+(?:, ip=[\d.]+)?\) )?"
SUFFIX = r"(?: \[repeated \d+x across cluster\])?"
STAGE = r"\[(?:mem|tem_alone|tem)\]"
# The lines of docs/training.md, "Console output", in the order a run prints them.
DOCUMENTED = [
    r"\[run\] \S+: \S+(?: then \S+)*, on \S+, into \S+",
    rf"{STAGE} start: \w+, (?:\d+ \w+, )*\d+ \w+ train rows, \d+ worker\(s\) x [\d.]+ CPU"
    r"(?: \+ 1 GPU)?, up to \d+ epochs",
    rf"{STAGE} embedding rows counted for the L2 in \d+ s \(\d+ tables\)",
    rf"{STAGE} before epoch 1: valid auc [\d.na/]+ gauc [\d.na/]+"
    r"(?: \(start: \w+; valid auc of each start: \w+ [\d.na/]+(?:, \w+ [\d.na/]+)+\))?",
    rf"{STAGE} epoch \d+ step \d+: ~\d+ rows, ~\d+ rows/s, loss [\d.]+",
    rf"{STAGE} epoch \d+/\d+: \d+ rows, [\d,]+ rows/s, loss [\d.]+, valid auc [\d.na/]+ gauc "
    r"[\d.na/]+, best epoch \d+(?: \(early stop\))?",
    r"\[eval\] scoring the \w+ test rows with \w+'s best checkpoint",
    r"\[run\] \S+ done in [\d.]+ min: \d+ target test rows \(positive rate [\d.]+\); "
    r"\S+/summary\.md has every table, metrics\.json the numbers, curves\.png the curves",
    r"\|.*\|",  # the test table
]
# Warnings of docs/training.md, "Console output", each naming a condition of the run.
WARNINGS = [
    # Fractional CPUs (conf/run/default.yaml) let Ray start more workers than cores at once.
    r"\(raylet\) WARNING: \d+ PYTHON worker processes have been started on node: \w+ with "
    r"address: 127\.0\.0\.1, which is \d+x the maximum expected startup concurrency \(\d+\)\..*",
    # Actors Ray may restart whose constructor arguments live in the object store.
    r"\[[\d\-: ,]+ E \d+ \d+\] core_worker\.cc:\d+: Actor with class name: '[^']+' and ID: "
    r"'\w+' has constructor arguments in the object store and max_restarts > 0\..*",
    # train.find_unused_parameters is on, and a step used every parameter.
    r"\[rank\d\]:\[W[\d .:]+ reducer\.cpp:\d+\] Warning: find_unused_parameters=True was "
    r"specified in DDP constructor, but did not find any unused parameters in the forward "
    r"pass\..*",
]
ALLOWED = [re.compile(PREFIX + p + SUFFIX) for p in DOCUMENTED + WARNINGS]
# docs/training.md: a run of the quick start's config prints at most about this many lines.
MOST_LINES = 40


def console_lines(text: str) -> list[str]:
    return [COLOUR.sub("", line) for line in text.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def run(mkt_run: dict) -> dict:
    """The session's run (conf/run/quickstart.yaml, 2 epochs of batch 256, progress lines every
    8 steps, MLflow experiment `console`)."""
    done = mkt_run["done"]
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return {"done": done, "dir": mkt_run["dir"], "store": mkt_run["store"]}


def test_console_holds_only_the_documented_lines(run: dict) -> None:
    done = run["done"]
    out, err = console_lines(done.stdout), console_lines(done.stderr)
    unknown = [line for line in out + err if not any(p.fullmatch(line) for p in ALLOWED)]
    assert not unknown, "\n".join(unknown)
    assert len(out + err) <= MOST_LINES, "\n".join(out + err)
    # What must be there: a start line and one line per epoch of each stage, progress lines,
    # the evaluation, and the test table at the end.
    text = "\n".join(out + err)
    stages = ("mem", "tem_alone", "tem")
    for stage in stages:
        assert len(re.findall(rf"\[{stage}\] start: ", text)) == 1, stage
        assert len(re.findall(rf"\[{stage}\] epoch \d/2: ", text)) == 2, stage
    # The TEM, built on the trained MEM and TEM alone, is scored once before its first epoch
    # (one line for its starts); the others are not.
    assert [re.findall(rf"\[{s}\] before epoch 1: ", text) for s in stages] == [
        [],
        [],
        ["[tem] before epoch 1: "],
    ]
    assert re.search(r"\[mem\] epoch 1 step 8: ", text)
    assert "[eval] scoring the article test rows with tem's best checkpoint" in text
    assert out[-6].startswith("[run] mkt done in ")
    assert out[-5:-3] == [
        "| scores | AUC | GAUC | GAUC coverage | log loss |",
        "|---|---|---|---|---|",
    ]
    assert [line.split(" | ")[0] for line in out[-3:]] == [
        "| mkt",
        "| like-rate floor (smoothed user and item rates)",
        "| oracle (true p_like)",
    ]


def test_mlflow_holds_the_run_and_both_stages(
    run: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file://{run['store']}")
    experiment = client.get_experiment_by_name("console")
    runs = client.search_runs([experiment.experiment_id])
    (top,) = [r for r in runs if PARENT_TAG not in r.data.tags]
    assert top.info.status == "FINISHED" and top.info.run_name == "run"
    # Parameters: the resolved config RUN_DIR/config.yaml records, defaults included.
    recorded = yaml.safe_load((run["dir"] / "config.yaml").read_text())
    del recorded["invocation"], recorded["code_commit"]
    assert top.data.params == {k: str(v) for k, v in flatten(recorded).items()}
    assert top.data.params["params.mem.gamma"] == "0.01"  # a model default, resolved
    assert top.data.tags["model"] == "mkt"
    metrics = json.loads((run["dir"] / "metrics.json").read_text())
    test = metrics["test"]
    assert top.data.metrics["test_auc"] == pytest.approx(test["model"]["auc"])
    assert top.data.metrics["test_gauc"] == pytest.approx(test["model"]["gauc"])
    assert top.data.metrics["test_oracle_auc"] == pytest.approx(test["oracle"]["auc"])
    assert top.data.metrics["test_like_rate_auc"] == pytest.approx(test["like_rate"]["auc"])
    artifacts = {a.path for a in client.list_artifacts(top.info.run_id)}
    assert {"curves.png", "summary.md", "metrics.json", "config.yaml"} <= artifacts
    png = Path(client.download_artifacts(top.info.run_id, "curves.png", str(tmp_path)))
    assert png.read_bytes() == (run["dir"] / "curves.png").read_bytes()

    # Each stage: a run nested under the run, with its model parameters and every epoch.
    stages = {r.data.tags["stage"]: r for r in runs if r.data.tags.get(PARENT_TAG)}
    assert set(stages) == {"mem", "tem_alone", "tem"} and len(runs) == 4
    for summary in metrics["stages"]:
        stage = stages[summary["name"]]
        assert stage.data.tags[PARENT_TAG] == top.info.run_id
        assert stage.info.status == "FINISHED"
        assert stage.data.params["model"] == summary["model"]
        assert stage.data.params["dropout"] == str(summary["params"]["dropout"])
        for name in ("valid_auc", "train_loss", "rows_per_s"):
            logged = client.get_metric_history(stage.info.run_id, name)
            assert [(m.step, m.value) for m in sorted(logged, key=lambda m: m.step)] == [
                (h["epoch"], pytest.approx(h[name])) for h in summary["history"]
            ], (summary["name"], name)


def test_mlflow_ui_serves_the_store(run: dict) -> None:
    """docs/training.md's command: `mlflow ui` on 127.0.0.1 reading the run's store."""
    port = _free_port()
    ui = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "mlflow"),
            "ui",
            *["--host", "127.0.0.1", "--port", str(port)],
            *["--backend-store-uri", f"file://{run['store']}"],
        ],
        env={**os.environ, "MLFLOW_ALLOW_FILE_STORE": "true"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_dashboard(port, ui)

        def call(path: str, body: dict) -> dict:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}/api/2.0/mlflow/{path}",
                data=json.dumps(body).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(request, timeout=60) as answer:
                return json.loads(answer.read())

        experiments = call("experiments/search", {"max_results": 10})["experiments"]
        (experiment,) = [e for e in experiments if e["name"] == "console"]
        found = call("runs/search", {"experiment_ids": [experiment["experiment_id"]]})
        names = sorted(r["info"]["run_name"] for r in found["runs"])
        assert names == ["run", "run/mem", "run/tem", "run/tem_alone"]
    finally:
        os.killpg(ui.pid, 15)
        ui.wait(timeout=60)
