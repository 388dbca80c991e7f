"""train/tune.py: the sweep config, the stage-1 cache key, the trial concurrency, and a real
2 x 2 sweep (generator -> Spark samples -> Ray Tune over both MKT stages) that is interrupted,
resumed, where ASHA stops the trials that cannot learn, and whose best config resolves to the
best trial's run."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

# train.sweep imports Ray: keep any Ray this test process starts on the loopback address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import pytest
import yaml

from mkt.contract import ConfigError
from mkt.pipelines import pipeline
from train.checks import run_config_text
from train.config import load_run_config
from train.stage1_cache import KEY_FILE as STAGE1_KEY_FILE
from train.stage1_cache import stage1_key, stage1_material
from train.sweep import CONCURRENCY_FILE, STAGE1_DIR, _plain, sweep_concurrency, trial_concurrency
from train.sweep_config import load_sweep_config, max_reports, trial_run_config
from train.sweep_report import BEST_CONFIG_FILE, TABLE_FILE, TRIALS_DIR
from train.tracking import IDS_FILE, PARENT_TAG
from train.tune import INTERRUPTED

REPO = Path(__file__).resolve().parents[1]
TUNE_PY = REPO / "train" / "tune.py"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ---------------------------------------------------------------------------------------------
# Config and cache key (no Ray cluster)


def test_sweep_config_layers(tmp_path: Path) -> None:
    default = load_sweep_config()
    assert default["search_space"]["params.mem.gamma"] == {"grid": [0, 0.001, 0.01, 0.1, 1]}
    assert default["run"]["scaling"]["num_workers"] == 1  # the sweep's `run` over run defaults
    sweep_file = write_yaml(
        tmp_path / "sweep.yaml",
        {
            "search_space": {"train.lr": {"loguniform": [1e-4, 1e-2]}},
            "run": {"train": {"epochs": 3}},
            "metric": "auc",
        },
    )
    sweep = load_sweep_config(sweep_file, ["run.train.epochs=4", "scheduler.name=fifo"])
    # A file's search space replaces the default one; `run` layers merge key by key.
    assert sweep["search_space"] == {"train.lr": {"loguniform": [1e-4, 1e-2]}}
    assert sweep["run"]["train"]["epochs"] == 4
    assert sweep["run"]["scaling"]["num_workers"] == 1
    assert sweep["scheduler"] == {"name": "fifo", "grace_period": 2, "reduction_factor": 2}
    trial = trial_run_config(sweep["run"], {"train.lr": 0.005, "params.tem.dropout": 0.1}, "auc")
    assert trial["train"]["lr"] == 0.005
    assert trial["params"]["tem"] == {"dropout": 0.1}
    # The sweep's metric ranks every stage's checkpoints too.
    assert trial["train"]["early_stopping"]["metric"] == "auc"
    assert _plain(np.int64(16)) == 16 and type(_plain(np.int64(16))) is int
    # Repeats are refused on a grid-only space (test_bad_sweep_configs_name_the_key), not where
    # a distribution is sampled.
    repeated = ["num_samples=3", "search_space={train.lr: {loguniform: [1.0e-4, 1.0e-2]}}"]
    assert load_sweep_config(None, repeated)["num_samples"] == 3


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["schedulr.name=fifo"], "unknown key 'schedulr'"),
        (["run.train.learning_rate=0.1"], "unknown key 'train.learning_rate'"),
        (["search_space={params.mem.gama: {grid: [0, 1]}}"], r"search_space\.params\.mem\.gama"),
        (["search_space={train.learnrate: {grid: [0.1]}}"], "unknown key 'train.learnrate'"),
        (["search_space={params.mem.gamma: {range: [0, 1]}}"], "expected one of"),
        (["search_space={params.mem.gamma: {loguniform: [0, 1]}}"], "low must be > 0"),
        (["search_space={params.mem.d_hfa: {grid: [16, 'wide']}}"], "d_hfa"),
        (["metric=logloss"], "metric"),
        (["run.train.epochs=1", "scheduler.grace_period=6"], "scheduler.grace_period"),
        (["max_concurrent_trials=0"], "max_concurrent_trials"),
        (["num_samples=2"], "num_samples: 2 repeats of a grid-only search space"),
    ],
)
def test_bad_sweep_configs_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sweep_config(None, overrides)


def test_scheduler_horizon_covers_every_trial() -> None:
    """ASHA's max_t must not stop a trial before its last report, whatever epochs it draws."""
    swept = ["run.train.epochs=2", "search_space={train.epochs: {grid: [1, 5]}}"]
    # MEM, TEM alone and TEM epochs, the TEM's start, the pipeline's score
    assert max_reports(load_sweep_config(None, swept)) == 3 * 5 + 1 + 1
    load_sweep_config(None, [*swept, "scheduler.grace_period=17"])
    with pytest.raises(ConfigError, match=r"scheduler\.grace_period"):
        load_sweep_config(None, [*swept, "scheduler.grace_period=18"])


def test_stage1_key_is_what_mem_depends_on() -> None:
    base = load_sweep_config()["run"]
    mem = pipeline("mkt")[0]

    def key(assignments: dict, fingerprint: str = "samples-a") -> str:
        config = trial_run_config(base, assignments, "gauc")
        return stage1_key(stage1_material(config, mem, fingerprint, gpu=False))

    plain = key({"params.mem.gamma": 0.01})
    # TEM-only parameters and a MEM default written out share the MEM ...
    assert key({"params.mem.gamma": 0.01, "params.tem.dropout": 0.3}) == plain
    assert key({"params.mem.gamma": 0.01, "params.mem.d_hfa": 32}) == plain
    # ... anything stage 1 depends on does not.
    others = [
        key({"params.mem.gamma": 0.1}),
        key({"params.mem.gamma": 0.01, "params.mem.d_hfa": 16}),
        key({"params.mem.gamma": 0.01, "train.lr": 0.01}),
        key({"params.mem.gamma": 0.01, "seed": 1}),
        key({"params.mem.gamma": 0.01, "scaling.num_workers": 2}),
        key({"params.mem.gamma": 0.01}, fingerprint="samples-b"),
    ]
    assert len({plain, *others}) == 1 + len(others)


def test_trial_concurrency_follows_free_cores_and_is_kept_on_resume(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import ray

    free = {"CPU": 4.0}  # the embedded Ray declares ray.num_cpus = 4 logical CPUs
    monkeypatch.setattr(ray, "available_resources", lambda: dict(free))
    monkeypatch.setattr(ray, "cluster_resources", lambda: dict(free))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})  # a 2-core machine
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    default = load_sweep_config()
    # Embedded: the real cores, not the declared CPUs, over a trial's 1 worker x 1 thread.
    assert trial_concurrency(default) == 2
    assert trial_concurrency(load_sweep_config(None, ["run.scaling.num_workers=2"])) == 1
    assert trial_concurrency(load_sweep_config(None, ["run.scaling.torch_threads=4"])) == 1
    assert trial_concurrency(load_sweep_config(None, ["max_concurrent_trials=3"])) == 3
    assert sweep_concurrency(default, tmp_path, resuming=False) == 2
    assert json.loads((tmp_path / CONCURRENCY_FILE).read_text()) == {"max_concurrent_trials": 2}

    # A 16-CPU cluster (joined through RAY_ADDRESS): its free CPUs, not this machine's cores.
    free.update(CPU=16.0)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert trial_concurrency(default) == 16
    assert trial_concurrency(load_sweep_config(None, ["run.scaling.num_workers=2"])) == 8
    free.update(GPU=3.0)  # use_gpu auto: at most free GPUs // workers per trial
    assert trial_concurrency(default) == 3
    # A resumed sweep reports what it started with (Tuner.restore keeps that), not today's.
    assert sweep_concurrency(default, tmp_path, resuming=True) == 2


# ---------------------------------------------------------------------------------------------
# A real sweep


def run_tune(args: list[str]) -> subprocess.CompletedProcess:
    """train/tune.py in its own process with an embedded Ray (token auth off)."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=900
    )


def read_table(sweep_dir: Path) -> list[dict[str, str]]:
    with (sweep_dir / TABLE_FILE).open(newline="") as f:
        return list(csv.DictReader(f))


# The tiny sweep's grid, in Tune's trial order (the first key varies fastest).
GOOD_LR, BAD_LR = 0.01, 1.0e-6
TABLE_HEADER = (
    "| trial | params.tem.dropout | train.lr | status | reports | stage 1 | epochs run "
    "| valid GAUC (selects) | valid AUC |"
)


@pytest.fixture(scope="module")
def sweep(generated_samples: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2 x 2 sweep, TEM dropout x learning rate (dropout touches TEM only, so each lr's MEM
    serves two trials), one epoch per stage, one trial at a time, interrupted by its fault drill
    once the first trial has ended, then resumed by rerunning the same command.

    ASHA stops the lr = 1e-6 trials. With 5 reports per trial (MEM epoch, TEM alone epoch,
    TEM start, TEM epoch, score),
    grace period 1 and reduction factor 4 give a single rung, at report 1: the MEM's epoch.
    The two lr = 0.01 trials run first (trial order) and share one MEM, so they tie there (a
    tie is not below the cutoff) and both finish; an lr = 1e-6 MEM barely leaves its
    initialisation (validation GAUC 0.47-0.56 against 0.59-0.65 over three seeds; 150 users
    could not tell them apart), so the first lr = 1e-6 trial is stopped after its MEM epoch, the second at once on that cached epoch's replayed report.
    Tune does not save ASHA's rungs: after the resume they start empty, and the unfinished
    lr = 0.01 trial, run first, is recorded first again."""
    root = tmp_path_factory.mktemp("sweep")
    samples, sweep_dir = generated_samples, root / "sweep"
    config = write_yaml(
        root / "tiny.yaml",
        {
            "search_space": {
                "params.tem.dropout": {"grid": [0.0, 0.2]},
                "train.lr": {"grid": [GOOD_LR, BAD_LR]},
            },
            # No embedding L2: its prior outweighs 400 users' rows within one epoch, and the
            # schedule needs the good lr to leave its initialisation there.
            "run": {
                "train": {"epochs": 1, "batch_size": 256, "embedding_l2": 0.0},
                # Interrupted and resumed: the MLflow runs must carry over.
                "tracking": {
                    "mlflow_uri": f"file://{root / 'mlruns'}",
                    "mlflow_experiment": "tiny",
                },
            },
            "scheduler": {"name": "asha", "grace_period": 1, "reduction_factor": 4},
            "max_concurrent_trials": 1,
            "fault": {"interrupt_after_trials": 1},
        },
    )
    command = [str(TUNE_PY), "--samples", str(samples), "--output", str(sweep_dir)]
    command += ["--config", str(config)]
    first = run_tune(command)
    before = {row["trial"]: row for row in read_table(sweep_dir)}
    stamps = {
        trial: (sweep_dir / TRIALS_DIR / trial / "metrics.json").stat().st_mtime_ns
        for trial, row in before.items()
        if row["status"] == "finished"
    }
    second = run_tune(command)
    return {
        "samples": samples,
        "dir": sweep_dir,
        "command": command,
        "first": first,
        "before": before,
        "stamps": stamps,
        "second": second,
        "store": root / "mlruns",
    }


@pytest.mark.slow
def test_interrupted_sweep_resumes_and_asha_stops_weak_trials(sweep: dict) -> None:
    first, second = sweep["first"], sweep["second"]
    assert first.returncode == INTERRUPTED, first.stdout[-4000:] + first.stderr[-4000:]
    assert "rerun the same command to resume" in first.stderr
    assert len(sweep["stamps"]) == 1, "not exactly one trial had finished at the interrupt"
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "resuming" in second.stdout and "1 trial(s) at a time, as first started" in second.stdout
    rows = read_table(sweep["dir"])
    status = {(r["params.tem.dropout"], r["train.lr"]): r["status"] for r in rows}
    good, bad = str(GOOD_LR), str(BAD_LR)
    assert status == {
        ("0.0", good): "finished",
        ("0.2", good): "finished",
        ("0.0", bad): "stopped",
        ("0.2", bad): "stopped",
    }
    # Stopped at ASHA's rung, their first report (the MEM epoch), below every finished trial
    # (an untrained network's AUC is not 0.5 where user features alone rank well): no TEM, no
    # evaluation.
    finished = [float(r["last_score"]) for r in rows if r["status"] == "finished"]
    for r in rows:
        if r["status"] == "stopped":
            assert r["reports"] == "1" and float(r["last_score"]) < min(finished)
            assert not (sweep["dir"] / TRIALS_DIR / r["trial"] / "metrics.json").exists()
            assert f"{r['trial']} stopped by the scheduler" in second.stdout  # progress line
    # Finished trials kept their results: their run was not repeated (not even evaluated).
    for trial, stamp in sweep["stamps"].items():
        assert (sweep["dir"] / TRIALS_DIR / trial / "metrics.json").stat().st_mtime_ns == stamp
    assert "[sweep] 4/4 ended (2 finished)" in second.stdout  # progress lines


@pytest.mark.slow
def test_sweep_outputs_shared_mem_and_best_config(sweep: dict) -> None:
    sweep_dir = sweep["dir"]
    rows = read_table(sweep_dir)
    assert len(rows) == 4
    done = [r for r in rows if r["status"] == "finished"]
    assert {r["train.lr"] for r in done} == {str(GOOD_LR)}
    # One MEM per lr: the two finished trials share the lr = 0.01 one (trained by one, taken
    # from the cache by the other); the stopped trials' lr = 1e-6 MEM is the second entry. The
    # finished trials share their TEM alone too (it is built on no other stage), the third.
    assert len(list((sweep_dir / STAGE1_DIR).glob(f"*/{STAGE1_KEY_FILE}"))) == 3
    for stage in ("mem", "tem_alone"):
        shared = {
            (sweep_dir / TRIALS_DIR / r["trial"] / "checkpoints" / stage).resolve() for r in done
        }
        assert (
            len(shared) == 1 and next(iter(shared)).parent.parent.parent == sweep_dir / STAGE1_DIR
        )
    assert sorted(r["stage1"] for r in done) == ["cached", "trained"]

    # Rows come best first, finished ones before stopped ones; the best config is the first
    # row's, chosen on validation GAUC.
    assert [r["status"] for r in rows] == ["finished", "finished", "stopped", "stopped"]
    assert float(rows[0]["valid_gauc"]) >= float(rows[1]["valid_gauc"])
    best = rows[0]
    best_config = yaml.safe_load((sweep_dir / BEST_CONFIG_FILE).read_text())
    assert best_config["train"]["lr"] == GOOD_LR
    assert best_config["params"]["tem"]["dropout"] == float(best["params.tem.dropout"])
    assert json.loads((sweep_dir / CONCURRENCY_FILE).read_text()) == {"max_concurrent_trials": 1}
    summary = (sweep_dir / "summary.md").read_text()
    assert "- trials: 2 finished, 2 stopped early by the scheduler (asha), 0 failed\n" in summary
    assert "- 1 trial(s) at a time;" in summary
    assert "chosen on target validation GAUC" in summary
    assert "not used to choose it" in summary  # test metrics, apart from the choice
    assert (sweep_dir / "metric.png").read_bytes()[:4] == b"\x89PNG"

    # summary.md's table: the header, then one row per trial, in trials.csv's order.
    lines = summary.splitlines()
    top = lines.index("## All trials, best validation GAUC first") + 2
    assert lines[top] == TABLE_HEADER
    assert lines[top + 1] == "|" + "---|" * 9
    body = lines[top + 2 : top + 2 + len(rows)]
    assert lines[top + 2 + len(rows)] == ""
    for line, r in zip(body, rows, strict=True):
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        assert cells[:3] == [r["trial"], r["params.tem.dropout"], r["train.lr"]]
        assert cells[3].startswith(r["status"]) and cells[4:6] == [r["reports"], r["stage1"]]
        if r["status"] == "finished":
            assert cells[6] == "mem 1, tem_alone 1, tem 1"
            assert cells[7:] == [f"{float(r[k]):.4f}" for k in ("valid_gauc", "valid_auc")]
        else:
            assert cells[3] == f"stopped (last report {float(r['last_score']):.4f})"
            assert cells[6:] == ["", "n/a", "n/a"]

    # best_config.yaml alone determines the run: train/run.py's loader resolves it to the
    # best trial's resolved config.yaml (what train/run.py compares before it reuses a RUN_DIR)...
    best_dir = sweep_dir / TRIALS_DIR / best["trial"]
    trial_config = (best_dir / "config.yaml").read_text()
    invocation = {"samples": str(sweep["samples"].resolve()), "oracle": None}
    assert yaml.safe_load(trial_config)["invocation"] == invocation
    best_config_run = load_run_config(sweep_dir / BEST_CONFIG_FILE)
    assert run_config_text(best_config_run, invocation) == trial_config
    # ... and train/run.py takes it as that trial's run: given a copy of the trial's RUN_DIR, it
    # accepts the config, trains neither stage again and scores the test rows as the trial did.
    run_dir = sweep["dir"].parent / "best_run"
    shutil.copytree(best_dir, run_dir, symlinks=True)
    # A new RUN_DIR: no results yet, and an MLflow run of its own (not the trial's).
    (run_dir / "metrics.json").unlink()
    (run_dir / IDS_FILE).unlink()
    done_run = run_tune(
        [
            str(REPO / "train" / "run.py"),
            "--samples",
            str(sweep["samples"]),
            "--output",
            str(run_dir),
            "--config",
            str(sweep_dir / BEST_CONFIG_FILE),
        ]
    )
    assert done_run.returncode == 0, done_run.stdout[-4000:] + done_run.stderr[-4000:]
    for stage in ("mem", "tem_alone", "tem"):
        assert f"[{stage}] already trained in {run_dir}" in done_run.stdout
    assert (run_dir / "config.yaml").read_text() == trial_config
    metrics = json.loads((run_dir / "metrics.json").read_text())
    trial_metrics = json.loads((best_dir / "metrics.json").read_text())
    assert [(s["name"], s["epochs_run"]) for s in metrics["stages"]] == [
        ("mem", 1),
        ("tem_alone", 1),
        ("tem", 1),
    ]
    scored, trial_scored = metrics["test"]["model"], trial_metrics["test"]["model"]
    assert scored["rows"] == trial_scored["rows"]
    for key in ("auc", "gauc", "logloss"):
        assert scored[key] == pytest.approx(trial_scored[key], abs=1e-6), key


@pytest.mark.slow
def test_mlflow_holds_the_sweep_and_its_trials(
    sweep: dict, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The sweep's MLflow run (its files as artifacts), each trial's run nested under it: the
    finished ones with their resolved config, stage runs, test metrics and curves.png, the
    stopped ones KILLED with their last score."""
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=f"file://{sweep['store']}")
    runs = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    # (The best trial's config, rerun by test_sweep_outputs_shared_mem_and_best_config, is
    # tracked as a run of its own, outside the sweep.)
    (top,) = [r for r in runs if PARENT_TAG not in r.data.tags and r.info.run_name == "sweep"]
    # Interrupted (KILLED), then resumed into the same run.
    assert top.info.status == "FINISHED" and top.info.run_name == "sweep"
    assert top.data.params["search_space.train.lr.grid"] == str([GOOD_LR, BAD_LR])
    assert top.data.metrics["finished"] == 2 and top.data.metrics["stopped"] == 2
    artifacts = {a.path for a in client.list_artifacts(top.info.run_id)}
    assert {"summary.md", "trials.csv", "metric.png", "best_config.yaml"} <= artifacts

    trials = {r.info.run_name: r for r in runs if r.data.tags.get(PARENT_TAG) == top.info.run_id}
    rows = read_table(sweep["dir"])
    assert set(trials) == {r["trial"] for r in rows}
    for row in rows:
        trial = trials[row["trial"]]
        assert trial.data.params["train.lr"] == row["train.lr"]
        assert trial.data.params["params.tem.dropout"] == row["params.tem.dropout"]
        stages = [r for r in runs if r.data.tags.get(PARENT_TAG) == trial.info.run_id]
        if row["status"] == "stopped":
            assert trial.info.status == "KILLED"
            assert trial.data.metrics["last_score"] == pytest.approx(float(row["last_score"]))
            assert stages == []
            continue
        assert trial.info.status == "FINISHED"
        run_dir = sweep["dir"] / TRIALS_DIR / row["trial"]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert trial.data.metrics["test_auc"] == pytest.approx(metrics["test"]["model"]["auc"])
        png = client.download_artifacts(trial.info.run_id, "curves.png", str(tmp_path))
        assert Path(png).read_bytes() == (run_dir / "curves.png").read_bytes()
        # Every stage, the cached MEM too, each with its epoch's validation AUC.
        assert sorted(r.data.tags["stage"] for r in stages) == ["mem", "tem", "tem_alone"]
        for stage in stages:
            (history,) = [
                s["history"] for s in metrics["stages"] if s["name"] == stage.data.tags["stage"]
            ]
            assert stage.data.metrics["valid_auc"] == pytest.approx(history[-1]["valid_auc"])
    in_sweep = [r for r in runs if not r.info.run_name.startswith("best_run")]
    assert len(in_sweep) == 1 + len(rows) + 2 * 3  # the sweep, its trials, their stages
