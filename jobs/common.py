"""What the user-facing jobs share: launching the project's own commands as a user would, the
logistic-regression floor's training recipe, and comparing runs on the same test rows."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from etl.config import DRIVER_JAVA_OPTIONS

REPO = Path(__file__).resolve().parents[1]
DATA_CONFIG = REPO / "conf" / "data" / "tenrec.yaml"
# The floor gets its own recipe, chosen on validation like the deep models' (docs/training.md,
# "The training recipe"): a linear model wants a larger step and more epochs.
LR_RECIPE = ("train.lr=0.01", "train.embedding_l2=10", "train.epochs=10")


def shown_path(path: Path) -> str:
    """`path` relative to the repository when it lies inside it: tables written for the docs
    name no machine's directory."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


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


def build_samples_command(
    raw: Path, samples: Path, data_config: Path = DATA_CONFIG, activity: bool = False
) -> list[str]:
    """The Spark job that turns the generated raw files into samples, on local[2], its driver
    JVM tuned for the job (etl.config.DRIVER_JAVA_OPTIONS; docs/etl.md); `activity` adds the
    activity features (`--activity`)."""
    return [
        spark_submit(),
        "--master",
        "local[2]",
        "--driver-java-options",
        DRIVER_JAVA_OPTIONS,
        "etl/build_samples.py",
        "--config",
        str(data_config),
        "--input",
        str(raw),
        "--output",
        str(samples),
        *(["--activity"] if activity else []),
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


def paired_gains(
    samples: Path,
    runs: Mapping[str, Sequence[Path]],
    reference: str,
    resamples: int = 1000,
) -> dict[str, dict[str, Any]]:
    """The `reference` model against every other model of `runs` (model -> its RUN_DIRs, one
    per training seed) on the same target test rows, with the spread the test set alone causes
    (mkt.metrics.paired_bootstrap: users are drawn, so a user's rows move together; a model of
    several runs is compared by its runs' mean metric). Each result adds `gauc_support`, what
    the test rows' GAUC rests on (mkt.metrics.gauc_support)."""
    from deltalake import DeltaTable

    from mkt.metrics import gauc_support, paired_bootstrap
    from mkt.schema import FeatureSchema

    schema = FeatureSchema.load(samples)
    # The predictions table's names (train.evaluate), from the samples' columns.
    names = {schema.columns[c]: c for c in ("entity", "line_no", "user_key", "label")}
    keys = ["entity", "line_no"]
    # Only the partition the predictions cover: the target entity's test rows.
    test_rows = [(schema.columns["entity"], "=", schema.target_entity), ("split", "=", "test")]
    scored = (
        DeltaTable(str(samples / "samples"))
        .to_pyarrow_table(columns=list(names), filters=test_rows)
        .to_pandas()
        .rename(columns=names)
    )
    columns: dict[str, list[str]] = {}
    for model, run_dirs in runs.items():
        for k, run_dir in enumerate(run_dirs):
            column = f"{model}#{k}"
            predictions = DeltaTable(str(Path(run_dir) / "predictions")).to_pyarrow_table(
                columns=[*keys, "label", "score"]
            )
            merged = scored.merge(
                predictions.to_pandas().rename(columns={"score": column, "label": "scored"}),
                on=keys,
            )
            # Every test row scored once, with the samples' label: otherwise the bootstrap
            # would compare models on rows other than those their tables report.
            if len(merged) != len(scored) or predictions.num_rows != len(scored):
                raise RuntimeError(
                    f"{run_dir}: {predictions.num_rows} predictions for {len(scored)} test "
                    f"rows, {len(merged)} matched on (entity, line_no)"
                )
            if not (merged["scored"] == merged["label"]).all():
                raise RuntimeError(f"{run_dir}: predictions' labels differ from the samples'")
            scored = merged.drop(columns="scored")
            columns.setdefault(model, []).append(column)
    if scored.empty:
        raise RuntimeError(f"{samples}: no target test rows")

    def scores(model: str) -> Any:
        return scored[columns[model]].to_numpy().T

    labels, users = scored["label"].to_numpy(), scored["user_key"].to_numpy()
    support = gauc_support(labels, users)
    return {
        other: {
            **paired_bootstrap(labels, scores(reference), scores(other), users, resamples),
            "gauc_support": support,
        }
        for other in runs
        if other != reference
    }
