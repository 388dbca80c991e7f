"""train/run.py on a small samples table written here (no Spark): a worker SIGKILLed once in the
middle of an epoch, a non-finite loss, a corrupt checkpoint on resume, and the same command, then
a sweep of train/tune.py, submitted to a token-protected Ray head node this test starts on
127.0.0.1."""

from __future__ import annotations

import contextlib
import csv
import glob
import json
import math
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from deltalake import DeltaTable, write_deltalake

from mkt.synthetic import toy_columns, toy_schema

REPO = Path(__file__).resolve().parents[1]
RUN_PY = REPO / "train" / "run.py"
pytestmark = pytest.mark.slow


def write_toy_samples(out_dir: Path, rows: int, seed: int = 0) -> None:
    """A samples table in the data contract's layout from mkt.synthetic's planted signal:
    of every 10 lines of an entity, 7 train, 1 valid, 2 test."""
    schema = toy_schema()
    cols = toy_columns(schema, rows, seed=seed, target_share=0.5)
    split = np.array(["train"] * 7 + ["valid"] + ["test"] * 2)[cols["line_no"] % 10]
    arrays = {}
    for name, values in cols.items():
        if name in {f.name for f in schema.sequences}:
            arrays[name] = pa.array(list(values), type=pa.list_(pa.int64()))
        elif name == "entity":
            arrays[name] = pa.array(values.astype(str))
        elif name == "label":
            arrays[name] = pa.array(values.astype(np.int8))
        else:
            arrays[name] = pa.array(values.astype(np.int64))
    arrays["split"] = pa.array(split)
    write_deltalake(str(out_dir / "samples"), pa.table(arrays), partition_by=["entity", "split"])
    (out_dir / "feature_schema.json").write_text(json.dumps(schema.to_dict()))


@pytest.fixture(scope="module")
def toy_samples(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy_out")
    # 10000 rows: about 3400 target train rows, enough for TEM to learn the planted signal in 2
    # epochs (test AUC about 0.61, well clear of chance), so that comparing two runs' AUC means
    # something.
    write_toy_samples(out, rows=10000)
    return out


QUICK = [
    "model=tem_only",
    "train.epochs=2",
    "train.batch_size=128",
    "train.early_stopping.patience=5",
    "scaling.num_workers=2",
]


def run_cli(
    args: list[str], timeout_s: int = 400, expect_ok: bool = True
) -> subprocess.CompletedProcess:
    """train/run.py in its own process with an embedded Ray: nothing of this test process's
    imports or Ray state leaks in; token auth off whether or not ~/.ray/auth_token exists."""
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, str(RUN_PY), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if expect_ok:
        assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    return done


def _auc_standard_error(auc: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982): the standard error of an AUC measured on this many rows."""
    q1, q2 = auc / (2 - auc), 2 * auc**2 / (1 + auc)
    variance = (
        auc * (1 - auc) + (positives - 1) * (q1 - auc**2) + (negatives - 1) * (q2 - auc**2)
    ) / (positives * negatives)
    return math.sqrt(variance)


def test_worker_killed_mid_epoch_resumes_and_matches_an_undisturbed_run(
    toy_samples: Path, tmp_path: Path, submitted_run: dict
) -> None:
    """The last worker's process is SIGKILLed after batch 2 of epoch 2 (of 2); the restarted
    group resumes from epoch 1's checkpoint and its test AUC is that of an undisturbed run of the
    same config and seed (the `ray job submit` run of this module), within noise
    (docs/RELIABILITY.md, "A worker killed mid-epoch")."""
    killed_dir, calm_dir = tmp_path / "killed", submitted_run["dir"]
    assert submitted_run["job"].returncode == 0, submitted_run["job"].stderr[-3000:]
    # The counting pass of the embedding L2 (on by default) prints the line docs/training.md
    # documents (test_console.py's run has no L2).
    assert re.search(
        r"\[tem\] embedding rows counted for the L2 in \d+ s \(\d+ tables\)",
        submitted_run["job"].stdout + submitted_run["job"].stderr,
    )
    kill = ["fault.kill_worker_at.epoch=2", "fault.kill_worker_at.batch=2"]
    # Scored by the Ray Data actor pool (every other run of the suite has a test set small
    # enough for the driver): both paths must give every test row one score.
    pool = "eval.driver_scoring_rows=0"
    killed = run_cli(
        ["--samples", str(toy_samples), "--output", str(killed_dir), *QUICK, *kill, pool]
    )
    marker = killed_dir / ".fault-drill-tem"
    assert marker.read_text() == "worker 1 killed in epoch 2 after batch 2\n"
    assert "SIGKILL" in killed.stdout + killed.stderr
    metrics = json.loads((killed_dir / "metrics.json").read_text())
    calm = json.loads((calm_dir / "metrics.json").read_text())
    (stage,) = metrics["stages"]
    # Resumed after epoch 1 (its checkpoint), not from scratch and not after the lost epoch 2.
    assert stage["resumed_after"] == [1]
    assert [h["epoch"] for h in stage["history"]] == [1, 2]
    assert calm["stages"][0]["resumed_after"] == []
    assert metrics["ray_nodes"] == ["127.0.0.1"]  # the embedded Ray stays on loopback
    test_rows = DeltaTable(str(toy_samples / "samples")).to_pandas(
        partitions=[("entity", "=", "post"), ("split", "=", "test")], columns=["line_no", "label"]
    )
    predictions = DeltaTable(str(killed_dir / "predictions")).to_pandas()
    assert sorted(predictions["line_no"]) == sorted(test_rows["line_no"])
    assert metrics["test"]["model"]["rows"] == len(test_rows)
    # Both learned the planted signal (3 standard errors above chance), and they differ by at
    # most 2 standard errors of the AUC on these rows (about 0.038): a difference the sampling
    # noise of the AUC itself, and another training seed, also give (docs/RELIABILITY.md).
    auc, calm_auc = metrics["test"]["model"]["auc"], calm["test"]["model"]["auc"]
    positives = int(test_rows["label"].sum())
    noise = _auc_standard_error(calm_auc, positives, len(test_rows) - positives)
    assert min(auc, calm_auc) > 0.5 + 3 * noise, (auc, calm_auc, noise)
    assert abs(auc - calm_auc) <= 2 * noise, (auc, calm_auc, noise)


def test_nonfinite_loss_stops_the_run_then_a_corrupt_checkpoint_stops_its_resume(
    toy_samples: Path, tmp_path: Path
) -> None:
    """A NaN loss on worker 1 in epoch 2 ends the run at once (no retry), naming stage, epoch,
    global step and rank, with epoch 1's checkpoint the last one written. Rerunning the command
    resumes from that checkpoint; once its weights are damaged, the resume fails naming the file
    instead of loading them."""
    run_dir = tmp_path / "run"
    train_rows = DeltaTable(str(toy_samples / "samples")).to_pandas(
        partitions=[("entity", "=", "post"), ("split", "=", "train")], columns=["line_no"]
    )
    per_epoch = math.ceil(len(train_rows) // 2 / 128)  # steps of each of the 2 workers
    step = per_epoch + 2
    command = [
        *["--samples", str(toy_samples), "--output", str(run_dir), *QUICK],
        f"fault.nonfinite_loss_at_step={step}",
    ]
    failed = run_cli(command, expect_ok=False)
    out = failed.stdout + failed.stderr
    assert failed.returncode != 0, out[-4000:]
    assert (
        f"NonFiniteLossError: stage 'tem': non-finite loss at epoch 2, global step {step} "
        "(batch 2 of the epoch), on worker rank(s) [1]"
    ) in out, out[-4000:]
    assert "resuming after" not in out  # no restart was spent on it
    manifests = [Path(p).parent for p in glob.glob(f"{run_dir}/checkpoints/tem/*/manifest.json")]
    states = [json.loads((d / "train_state.json").read_text()) for d in manifests]
    assert [(s["epochs_done"], s["global_step"]) for s in states] == [(1, per_epoch)]
    assert not (run_dir / "metrics.json").exists()

    weights = manifests[0] / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    resumed = run_cli(command, expect_ok=False)
    out = resumed.stdout + resumed.stderr
    assert resumed.returncode != 0, out[-4000:]
    assert f"CheckpointError: {weights}: sha256 differs" in out, out[-4000:]
    assert "non-finite" not in out  # it stopped before training
    assert "[run] " not in out  # and before Ray and the pipeline started


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_dashboard(port: int, head: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if head.poll() is not None:
            raise RuntimeError(f"ray start exited with {head.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(1)
    raise TimeoutError("the Ray dashboard (job API) did not come up")


def _submit_when_agent_is_up(
    command: list[str], env: dict[str, str], patience_s: float = 120
) -> subprocess.CompletedProcess:
    """The dashboard answers before the node's job agent has registered; until it has, a
    submission is refused with "No available agent" and nothing runs, so it can be retried."""
    deadline = time.monotonic() + patience_s
    while True:
        job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
        if "No available agent" not in job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(2)


@pytest.fixture(scope="module")
def token_protected_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """`ray start --head` on 127.0.0.1 with token auth, for the module's `ray job submit` tests;
    yields the submit command's start and its environment. The temp dir is short: Ray's socket
    paths must stay under 107 bytes."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rayjob", dir="/tmp"))
    home = tmp_path_factory.mktemp("home")
    env = {
        **os.environ,
        "HOME": str(home),  # no ~/.ray/auth_token of the user leaks in
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        # A cluster keeps Ray's 2 s Train poll unless its environment says otherwise; this
        # one-node head polls as the embedded Ray does (docs/training.md, "Both ways of running").
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
    }
    env.pop("RAY_ADDRESS", None)
    dashboard = _free_port()
    # Every service on a port of its own: another Ray on this machine may hold the defaults
    # (an agent that cannot bind never registers, and jobs are then refused).
    ports = {
        name: _free_port()
        for name in (
            "port",
            "ray-client-server-port",
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "runtime-env-agent-port",
            "metrics-export-port",
        )
    }
    ray_bin = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [
            ray_bin,
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            *(f"--{name}={port}" for name, port in ports.items()),
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}",
            "--num-cpus=4",
            f"--temp-dir={ray_tmp}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_for_dashboard(dashboard, head)
        address = f"http://127.0.0.1:{dashboard}"
        yield {
            "submit": [ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO)],
            "env": env,
        }
    finally:
        _stop_session(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _stop_session(leader: subprocess.Popen, grace_s: float = 3) -> None:
    """Stop a process started with start_new_session=True and every process it started: all
    of them signalled at once, then what outlives the grace period killed. (`ray start
    --block`, signalled alone, stops its processes one kind after another, each with a grace
    period: once a sweep had left Ray Data's detached coordinator actor on the node, that took
    about 30 s, and still over 10 s with every process signalled. The node is thrown away.)"""
    try:
        os.killpg(leader.pid, signal.SIGTERM)
        leader.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(leader.pid, signal.SIGKILL)  # stragglers of the group, if any
    leader.wait()


@pytest.fixture(scope="module")
def submitted_run(
    toy_samples: Path, token_protected_head: dict, tmp_path_factory: pytest.TempPathFactory
) -> dict:
    """`ray job submit` of the unchanged train/run.py command (the QUICK config: 2 workers,
    2 epochs) to the token-protected head; also the undisturbed run that the worker-kill drill
    compares with."""
    run_dir = tmp_path_factory.mktemp("job") / "run"
    command = [
        sys.executable,  # the job runs with the head's PATH; name this interpreter
        "train/run.py",
        *["--samples", str(toy_samples), "--output", str(run_dir), *QUICK],
    ]
    submit, env = token_protected_head["submit"], token_protected_head["env"]
    job = _submit_when_agent_is_up([*submit, "--", *command], env)
    return {"dir": run_dir, "job": job, "command": command}


def test_ray_job_submit_to_a_token_protected_head(
    submitted_run: dict, token_protected_head: dict
) -> None:
    """`ray job submit` of the unchanged train/run.py command; a wrong token is refused."""
    submit, env = token_protected_head["submit"], token_protected_head["env"]
    unauthenticated = subprocess.run(
        [*submit, "--", *submitted_run["command"]],
        env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong-token"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert unauthenticated.returncode != 0, "the head accepted a job with a wrong token"
    assert "token" in unauthenticated.stderr.lower()
    job, run_dir = submitted_run["job"], submitted_run["dir"]
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["ray_nodes"] == ["127.0.0.1"]
    assert metrics["num_workers"] == 2
    assert metrics["stages"][0]["epochs_run"] == 2
    assert (run_dir / "predictions" / "_delta_log").is_dir()


def test_ray_job_submit_of_a_sweep(
    toy_samples: Path, tmp_path: Path, token_protected_head: dict
) -> None:
    """`ray job submit` of train/tune.py: a sweep joins the head (RAY_ADDRESS) and runs its
    trial there, with its outputs as an embedded sweep writes them (tests/test_tune.py runs
    the many-trial sweep, its scheduler and its resume)."""
    sweep_dir = tmp_path / "job_sweep"
    command = [
        sys.executable,
        "train/tune.py",
        *["--samples", str(toy_samples), "--output", str(sweep_dir)],
        "search_space={train.lr: {grid: [0.01]}}",
        *["scheduler.name=fifo", "max_concurrent_trials=1"],
        *["run.model=tem_only", "run.train.epochs=1", "run.train.batch_size=128"],
    ]
    submit = token_protected_head["submit"]
    job = _submit_when_agent_is_up([*submit, "--", *command], token_protected_head["env"])
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    with (sweep_dir / "trials.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["train.lr"], r["status"]) for r in rows] == [("0.01", "finished")]
    for r in rows:
        metrics = json.loads((Path(r["run_dir"]) / "metrics.json").read_text())
        assert metrics["ray_nodes"] == ["127.0.0.1"]
        assert metrics["stages"][0]["epochs_run"] == 1
    assert "- 1 trial(s) at a time;" in (sweep_dir / "summary.md").read_text()
    assert (sweep_dir / "best_config.yaml").is_file()
