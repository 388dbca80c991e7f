"""Sweep a pipeline's hyper-parameters (by default MKT's γ and d_HFA) with Ray Tune.

    python train/tune.py --samples OUT_DIR --output SWEEP_DIR [--config conf/tune/X.yaml]
                         [--oracle PATH] [key=value ...]

The sweep config is conf/tune/default.yaml, then --config, then the `key=value` overrides (for
example `scheduler.name=fifo run.train.epochs=3 max_concurrent_trials=1`). A trial is one whole
train/run.py run of the pipeline (for MKT: MEM, then TEM on the frozen MEM), trained by the same
code, and scored by the target validation metric. Without a cluster address (`run.ray.address`
or RAY_ADDRESS) it starts its own Ray on 127.0.0.1; under `ray job submit ... -- python
train/tune.py ...` it joins that cluster. SWEEP_DIR receives config.yaml, summary.md (every
trial, and the best one's test metrics), trials.csv, best_config.yaml, metric.png, trials/ (one
train/run.py RUN_DIR per trial), stage1/ (stage-1 checkpoints shared by trials) and tune/
(Tune's state and logs). Rerunning the same command resumes an interrupted sweep without
rerunning finished trials. See docs/tuning.md.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from mkt.contract import ConfigError
from mkt.schema import SchemaError, load_samples_dir
from train.checks import prepare_run_dir
from train.cluster import ray_session
from train.config import dump
from train.sweep_config import load_sweep_config

# Exit status of an interrupted sweep (as a shell reports Ctrl-C).
INTERRUPTED = 130


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, help="OUT_DIR of etl/build_samples.py")
    parser.add_argument("--output", required=True, help="SWEEP_DIR for this sweep's files")
    parser.add_argument("--config", help="sweep config YAML laid over conf/tune/default.yaml")
    parser.add_argument("--oracle", help="oracle.parquet (default: beside the raw input)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the sweep; returns what summary.md reports, as data."""
    args = parse_args(argv)
    sweep = load_sweep_config(args.config, args.overrides)
    samples_dir = Path(args.samples).resolve()
    load_samples_dir(samples_dir)
    output = Path(args.output).resolve()
    oracle = str(Path(args.oracle).resolve()) if args.oracle else None
    if sweep["stage1_cache"] is not None:
        sweep["stage1_cache"] = str(Path(sweep["stage1_cache"]).resolve())
    invocation = {"samples": str(samples_dir), "oracle": oracle}
    prepare_run_dir(output, dump({"invocation": invocation, **sweep}))
    with ray_session(sweep["run"]):
        # Imported only now: Ray's environment is set before Ray is first imported.
        from train.sweep import run_sweep

        return run_sweep(sweep, samples_dir, output, oracle)


def cli() -> None:
    """The command line, also installed as `mkt-tune` (pyproject.toml)."""
    try:
        outcome = main()
    except (ConfigError, SchemaError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if outcome["unfinished"]:
        print(
            f"interrupted with {outcome['unfinished']} trial(s) unfinished; rerun the same "
            "command to resume",
            file=sys.stderr,
        )
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    cli()
