"""What the user-facing jobs share: launching the project's own commands as a user would, and
the logistic-regression floor's training recipe."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from etl.config import DRIVER_JAVA_OPTIONS

REPO = Path(__file__).resolve().parents[1]
DATA_CONFIG = REPO / "conf" / "data" / "tenrec.yaml"
# The floor gets its own recipe, chosen on validation like the deep models' (docs/training.md,
# "The training recipe"): a linear model wants a larger step and more epochs.
LR_RECIPE = ("train.lr=0.01", "train.embedding_l2=10", "train.epochs=10")


def spark_submit() -> str:
    """spark-submit of this interpreter's environment (pip's pyspark), else the one on PATH."""
    beside = Path(sys.executable).parent / "spark-submit"
    found = str(beside) if beside.exists() else shutil.which("spark-submit")
    if found is None:
        sys.exit("spark-submit not found: install the project (`make setup`) first")
    return found


def spark_env() -> dict[str, str]:
    """This process's environment for a child that runs Spark: Spark's Python workers must be
    this interpreter, and every server binds to loopback."""
    return {
        **os.environ,
        "PYSPARK_PYTHON": sys.executable,
        "PYSPARK_DRIVER_PYTHON": sys.executable,
        "SPARK_LOCAL_IP": "127.0.0.1",
    }


def run_echoed(command: list[str]) -> None:
    """Print a command, then run it from the repository root with spark_env(); fail if it does."""
    print("$ " + " ".join(command), flush=True)
    subprocess.run(command, cwd=REPO, env=spark_env(), check=True)


def build_samples_command(raw: Path, samples: Path) -> list[str]:
    """The Spark job that turns the generated raw files into samples, on local[2], its driver
    JVM tuned for the job (etl.config.DRIVER_JAVA_OPTIONS; docs/etl.md)."""
    return [
        spark_submit(),
        "--master",
        "local[2]",
        "--driver-java-options",
        DRIVER_JAVA_OPTIONS,
        "etl/build_samples.py",
        "--config",
        str(DATA_CONFIG),
        "--input",
        str(raw),
        "--output",
        str(samples),
    ]


def train_command(
    samples: Path, run_dir: Path, config: Path, overrides: Sequence[str] = ()
) -> list[str]:
    """train/run.py of this interpreter on `samples` into `run_dir`, as a user types it."""
    return [
        sys.executable,
        str(REPO / "train" / "run.py"),
        "--samples",
        str(samples),
        "--output",
        str(run_dir),
        "--config",
        str(config),
        *overrides,
    ]
