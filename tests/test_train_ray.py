"""train/run.py on a small samples table written here (no Spark): a worker killed once on
purpose, and the same command submitted to a Ray head node this test starts on 127.0.0.1."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
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
    write_toy_samples(out, rows=3000)
    return out


QUICK = [
    "model=tem_only",
    "train.epochs=2",
    "train.batch_size=128",
    "train.early_stopping.patience=5",
    "scaling.num_workers=2",
]


def run_cli(args: list[str], timeout_s: int = 400) -> None:
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
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


def test_worker_killed_once_resumes_from_its_checkpoint(toy_samples: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    run_cli(
        [
            "--samples",
            str(toy_samples),
            "--output",
            str(run_dir),
            *QUICK,
            "fault.kill_worker_after_epoch=1",
        ]
    )
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert (run_dir / ".fault-drill-tem").exists(), "the drill never killed a worker"
    (stage,) = metrics["stages"]
    # The restarted group resumed after epoch 1 (from its checkpoint), not from scratch.
    assert stage["resumed_after"] == [1]
    assert [h["epoch"] for h in stage["history"]] == [1, 2]
    assert stage["epochs_run"] == 2
    test_rows = DeltaTable(str(toy_samples / "samples")).to_pandas(
        partitions=[("entity", "=", "post"), ("split", "=", "test")], columns=["line_no"]
    )
    predictions = DeltaTable(str(run_dir / "predictions")).to_pandas()
    assert sorted(predictions["line_no"]) == sorted(test_rows["line_no"])
    assert metrics["test"]["model"]["rows"] == len(test_rows)


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


def test_ray_job_submit_to_a_token_protected_head(toy_samples: Path, tmp_path: Path) -> None:
    """`ray start --head` on 127.0.0.1 with token auth, then `ray job submit` of the unchanged
    command. The temp dir is short: Ray's socket paths must stay under 107 bytes."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="rayjob", dir="/tmp"))
    home = tmp_path / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),  # no ~/.ray/auth_token of the user leaks in
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(16),
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
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
    run_dir = tmp_path / "job_run"
    try:
        _wait_for_dashboard(dashboard, head)
        address = f"http://127.0.0.1:{dashboard}"
        submit = [ray_bin, "job", "submit", "--address", address, "--working-dir", str(REPO)]
        command = [
            sys.executable,  # the job runs with the head's PATH; name this interpreter
            "train/run.py",
            "--samples",
            str(toy_samples),
            "--output",
            str(run_dir),
            *QUICK,
            "train.epochs=1",
            "scaling.num_workers=1",
        ]
        unauthenticated = subprocess.run(
            [*submit, "--", *command],
            env={**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "wrong-token"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert unauthenticated.returncode != 0, "the head accepted a job with a wrong token"
        assert "token" in unauthenticated.stderr.lower()
        job = _submit_when_agent_is_up([*submit, "--", *command], env)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["ray_nodes"] == ["127.0.0.1"]
        assert metrics["stages"][0]["epochs_run"] == 1
        assert (run_dir / "predictions" / "_delta_log").is_dir()
    finally:
        head.terminate()  # `ray start --block` stops the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, 9)
        shutil.rmtree(ray_tmp, ignore_errors=True)
