"""train/tune.py: the sweep config, the stage-1 cache key, and a real 2 x 2 sweep (generator ->
Spark samples -> Ray Tune over both MKT stages) that is interrupted, resumed, and whose best
config train/run.py accepts as that very run."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

# train.sweep imports Ray: keep any Ray this test process starts on the loopback address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import numpy as np
import pytest
import yaml

from etl.build_samples import build_samples
from jobs.generate_tenrec import VIDEO, GeneratorConfig, generate
from mkt.pipelines import pipeline
from train.config import ConfigError
from train.sweep import (
    BEST_CONFIG_FILE,
    STAGE1_DIR,
    TABLE_FILE,
    TRIALS_DIR,
    _plain,
    stage1_key,
    stage1_material,
)
from train.tune import INTERRUPTED, load_sweep_config, max_reports, trial_run_config

REPO = Path(__file__).resolve().parents[1]
TUNE_PY = REPO / "train" / "tune.py"


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
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
        (["run.train.epochs=1", "scheduler.grace_period=4"], "scheduler.grace_period"),
        (["max_concurrent_trials=0"], "max_concurrent_trials"),
    ],
)
def test_bad_sweep_configs_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_sweep_config(None, overrides)


def test_scheduler_horizon_covers_every_trial() -> None:
    """ASHA's max_t must not stop a trial before its last report, whatever epochs it draws."""
    swept = ["run.train.epochs=2", "search_space={train.epochs: {grid: [1, 5]}}"]
    assert max_reports(load_sweep_config(None, swept)) == 2 * 5 + 1  # MEM + TEM epochs, + 1
    load_sweep_config(None, [*swept, "scheduler.grace_period=11"])
    with pytest.raises(ConfigError, match=r"scheduler\.grace_period"):
        load_sweep_config(None, [*swept, "scheduler.grace_period=12"])


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


@pytest.fixture(scope="module")
def sweep(spark, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A 2 x 2 sweep, γ x a TEM-only parameter (so each MEM can serve two trials), one epoch per
    stage, interrupted by its fault drill once the first trial has ended, then resumed by
    rerunning the same command."""
    root = tmp_path_factory.mktemp("sweep")
    raw, samples, sweep_dir = root / "raw", root / "samples", root / "sweep"
    # Few users: like rates raised (a documented generator knob) for two-class validation users.
    rates = GeneratorConfig(target_like_rate={VIDEO: 0.2, "article": 0.15})
    generate(raw, num_users=150, seed=1, config=rates)
    build_samples(spark, REPO / "conf" / "data" / "tenrec.yaml", raw, samples)
    config = write_yaml(
        root / "tiny.yaml",
        {
            "search_space": {
                "params.mem.gamma": {"grid": [0, 0.01]},
                "params.tem.dropout": {"grid": [0.0, 0.2]},
            },
            "run": {"train": {"epochs": 1, "batch_size": 256}},
            # ASHA on, deciding only at a trial's last report: every trial ends its pipeline,
            # whatever order the trials report in.
            "scheduler": {"grace_period": 3},
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
    }


@pytest.mark.slow
def test_interrupted_sweep_resumes_without_rerunning_finished_trials(sweep: dict) -> None:
    first, second = sweep["first"], sweep["second"]
    assert first.returncode == INTERRUPTED, first.stdout[-4000:] + first.stderr[-4000:]
    assert "rerun the same command to resume" in first.stderr
    assert sweep["stamps"], "no trial had finished when the drill interrupted the sweep"
    assert len(sweep["stamps"]) < 4, "every trial had finished: the resume has nothing to do"
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    assert "resuming" in second.stdout
    rows = read_table(sweep["dir"])
    assert sorted(r["status"] for r in rows) == ["finished"] * 4
    # Finished trials kept their results: their run was not repeated (not even evaluated).
    for trial, stamp in sweep["stamps"].items():
        assert (sweep["dir"] / TRIALS_DIR / trial / "metrics.json").stat().st_mtime_ns == stamp
    assert "[sweep] 4/4 ended (4 finished)" in second.stdout  # progress lines


@pytest.mark.slow
def test_sweep_table_shared_mem_and_best_config_runs(sweep: dict) -> None:
    sweep_dir = sweep["dir"]
    rows = read_table(sweep_dir)
    assert len(rows) == 4
    assert {(r["params.mem.gamma"], r["params.tem.dropout"]) for r in rows} == {
        ("0", "0.0"),
        ("0", "0.2"),
        ("0.01", "0.0"),
        ("0.01", "0.2"),
    }
    # One MEM per γ, shared by the two trials of that γ: at least one of them took it from the
    # cache, and each trial's MEM checkpoints are the cache entry of its γ.
    entries = {r["params.mem.gamma"]: set() for r in rows}
    for r in rows:
        mem = (sweep_dir / TRIALS_DIR / r["trial"] / "checkpoints" / "mem").resolve()
        assert mem.parent.parent.parent == sweep_dir / STAGE1_DIR
        entries[r["params.mem.gamma"]].add(mem)
    assert all(len(paths) == 1 for paths in entries.values())
    assert len(set.union(*entries.values())) == 2
    for gamma in entries:
        assert "cached" in {r["stage1"] for r in rows if r["params.mem.gamma"] == gamma}

    # Rows come best first; the best config is the first row's, chosen on validation GAUC.
    scores = [float(r["valid_gauc"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    best = rows[0]
    best_config = yaml.safe_load((sweep_dir / BEST_CONFIG_FILE).read_text())
    assert best_config["params"]["mem"]["gamma"] == float(best["params.mem.gamma"])
    assert best_config["params"]["tem"]["dropout"] == float(best["params.tem.dropout"])
    summary = (sweep_dir / "summary.md").read_text()
    assert "chosen on target validation GAUC" in summary
    assert "not used to choose it" in summary  # test metrics, apart from the choice
    assert (sweep_dir / "metric.png").read_bytes()[:4] == b"\x89PNG"

    # train/run.py takes the best config and recognises it as exactly the best trial's run:
    # same resolved config (else it refuses the RUN_DIR), both stages already trained.
    run_dir = sweep_dir / TRIALS_DIR / best["trial"]
    before = json.loads((run_dir / "metrics.json").read_text())
    done = run_tune(
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
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "[mem] already trained" in done.stdout and "[tem] already trained" in done.stdout
    after = json.loads((run_dir / "metrics.json").read_text())
    assert after["stages"] == before["stages"]
    assert after["test"]["model"]["rows"] == before["test"]["model"]["rows"]
