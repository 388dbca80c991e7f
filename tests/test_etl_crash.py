"""A spark-submit run of etl/build_samples.py killed (SIGKILL) mid-write loses nothing committed.

The job runs as a real spark-submit process group (JVM and Python driver) and is killed at two
points: while it writes the samples files (before any commit), and right after the first Delta
table commit (inside the window where the three tables are at different versions). Each time the
previous version stays intact and readable, the schema file names the table versions that
belong together, and a re-run gives exactly what the undisturbed first run gave
(docs/RELIABILITY.md).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from deltalake import DeltaTable

from etl.build_samples import build_samples
from jobs.generate_tenrec import generate

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "conf" / "data" / "tenrec.yaml"
TABLES = ("samples", "vocab", "quarantine")
SORT_KEYS = {
    "samples": ["entity", "line_no"],
    "vocab": ["feature", "index"],
    "quarantine": ["entity", "line_no"],
}


def read_tables(out: Path, versions: dict[str, int] | None = None) -> dict[str, pd.DataFrame]:
    """Each table (at the given versions, else the latest) as a sorted, comparable frame."""
    frames = {}
    for table in TABLES:
        version = None if versions is None else versions[table]
        frame = DeltaTable(str(out / table), version=version).to_pyarrow_table().to_pandas()
        frame = frame.sort_values(SORT_KEYS[table]).reset_index(drop=True)
        for column in frame.columns:
            if column.startswith("seq_") and not column.endswith("_len"):
                frame[column] = frame[column].map(tuple)
        frames[table] = frame[sorted(frame.columns)]
    return frames


def assert_same_tables(got: dict[str, pd.DataFrame], expected: dict[str, pd.DataFrame]) -> None:
    for table in TABLES:
        pd.testing.assert_frame_equal(got[table], expected[table], obj=table)


def schema_file(out: Path) -> dict:
    return json.loads((out / "feature_schema.json").read_text())


def kill_when(out: Path, started_writing: str, tmp: Path) -> None:
    """Run the job with spark-submit; SIGKILL its process group once a path matching the glob
    `started_writing` exists that did not before the run."""
    command = [
        str(Path(sys.executable).parent / "spark-submit"),
        "--master",
        "local[2]",
        "--conf",
        f"spark.local.dir={tmp / 'spark-local'}",
        str(REPO / "etl" / "build_samples.py"),
        "--config",
        str(CONFIG),
        "--input",
        str(tmp / "raw"),
        "--output",
        str(out),
    ]
    log = tmp / f"killed-{len(list(tmp.glob('killed-*')))}.log"
    existing = set(out.glob(started_writing))
    env = {**os.environ, "PYSPARK_PYTHON": sys.executable, "SPARK_LOCAL_IP": "127.0.0.1"}
    with log.open("w") as output:
        job = subprocess.Popen(
            command, stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        deadline = time.monotonic() + 300
        try:
            while not set(out.glob(started_writing)) - existing:
                assert job.poll() is None, (
                    f"job ended before {started_writing}:\n{log.read_text()[-3000:]}"
                )
                assert time.monotonic() < deadline, f"no {started_writing} after 300 s"
                time.sleep(0.005)
        finally:
            # The whole group: the JVM (driver and executors) and the Python driver with it.
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode == -signal.SIGKILL


def test_killed_runs_keep_the_previous_version_and_a_rerun_recovers(spark, tmp_path: Path) -> None:
    generate(tmp_path / "raw", num_users=30, seed=5)
    out = tmp_path / "out"
    # Version 0: an undisturbed run, the reference for everything below.
    build_samples(spark, CONFIG, tmp_path / "raw", out)
    previous, previous_schema = read_tables(out), schema_file(out)
    assert previous_schema["table_versions"] == dict.fromkeys(TABLES, 0)

    # 1. Killed while writing the samples files (phase 5's tasks write them in place, under the
    # run's directory): nothing committed, the run's marker dir is left behind.
    kill_when(out, "samples/run-*/entity=*/split=*/part-*", tmp_path)
    assert {t: DeltaTable(str(out / t)).version() for t in TABLES} == dict.fromkeys(TABLES, 0)
    assert_same_tables(read_tables(out), previous)
    assert schema_file(out) == previous_schema
    assert list(out.glob("_staging-*"))

    # 2. Killed right after `samples` committed: the tables are at different versions now.
    kill_when(out, "samples/_delta_log/00000000000000000001.json", tmp_path)
    latest = read_tables(out)  # every table is readable at its latest version, complete
    assert DeltaTable(str(out / "samples")).version() == 1
    pd.testing.assert_frame_equal(latest["samples"], previous["samples"])
    # The schema file is still the previous run's and names that run's table versions.
    assert schema_file(out) == previous_schema
    assert_same_tables(read_tables(out, previous_schema["table_versions"]), previous)

    # 3. A re-run cleans up and commits a complete, consistent new version.
    build_samples(spark, CONFIG, tmp_path / "raw", out)
    assert not list(out.glob("_staging-*"))
    schema = schema_file(out)
    versions = {t: DeltaTable(str(out / t)).version() for t in TABLES}
    assert schema["table_versions"] == versions and versions["samples"] == 2
    assert_same_tables(read_tables(out), previous)
    assert {**schema, "table_versions": None} == {**previous_schema, "table_versions": None}
