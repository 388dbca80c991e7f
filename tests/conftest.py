"""Shared pytest fixtures. Servers bind to 127.0.0.1 only."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def spark() -> Iterator:
    """One real local Spark for the whole session: local[2], 2 shuffle partitions, no UI."""
    os.environ["SPARK_LOCAL_IP"] = "127.0.0.1"
    # Python workers must run this interpreter (the venv), not whatever `python` is on PATH.
    os.environ["PYSPARK_PYTHON"] = sys.executable
    os.environ["PYSPARK_DRIVER_PYTHON"] = sys.executable
    from pyspark.sql import SparkSession

    session = (
        SparkSession.builder.master("local[2]")
        .appName("mkt-tests")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.sql.shuffle.partitions", "2")
        .config("spark.default.parallelism", "2")
        .getOrCreate()
    )
    session.sparkContext.setLogLevel("ERROR")
    yield session
    session.stop()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The test models are tiny and the CI box has 2 cores: a second intra-op thread only adds
    barrier spin-waits, which slow training many-fold when the other core is busy."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def generated_samples(spark, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The generator's raw files for 400 users -> the Spark ETL's samples (OUT_DIR), built
    once a session. Few users: like rates raised (a documented generator knob) so that
    validation holds users with both labels."""
    from etl.build_samples import build_samples
    from jobs.generate_tenrec import VIDEO, GeneratorConfig, generate

    root = tmp_path_factory.mktemp("generated")
    rates = GeneratorConfig(target_like_rate={VIDEO: 0.2, "article": 0.15})
    generate(root / "raw", num_users=400, seed=1, config=rates)
    build_samples(spark, REPO / "conf" / "data" / "tenrec.yaml", root / "raw", root / "samples")
    return root / "samples"
