"""Train and evaluate a pipeline on the samples that etl/build_samples.py wrote.

    python train/run.py --samples OUT_DIR --output RUN_DIR [--config conf/run/X.yaml]
                        [--oracle PATH] [key=value ...]

The run config is conf/run/default.yaml, then --config, then the `key=value` overrides (for
example `model=tem_only params.mem.gamma=0 scaling.num_workers=1`). Without a cluster address
(`ray.address` or RAY_ADDRESS) it starts its own Ray on 127.0.0.1; under
`ray job submit ... -- python train/run.py ...` it joins that cluster. RUN_DIR receives
config.yaml, metrics.json, summary.md, curves.png, predictions/ (Delta), checkpoints/ and
tensorboard/. Rerunning the same command resumes an interrupted run. See docs/training.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

from mkt.contract import ConfigError
from mkt.pipelines import pipeline
from mkt.schema import SchemaError, load_samples_dir
from train.checkpoints import CheckpointError
from train.checks import check_stage_params, prepare_run_dir, resolved_config, run_config_text
from train.cluster import ray_environment, ray_session
from train.config import load_run_config
from train.errors import NonFiniteLossError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, help="OUT_DIR of etl/build_samples.py")
    parser.add_argument("--output", required=True, help="RUN_DIR for this run's files")
    parser.add_argument("--config", help="run config YAML laid over conf/run/default.yaml")
    parser.add_argument("--oracle", help="oracle.parquet (default: beside the raw input)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = load_run_config(args.config, args.overrides)
    check_stage_params(config)
    config = resolved_config(config)
    samples_dir = Path(args.samples).resolve()
    load_samples_dir(samples_dir)
    run_dir = Path(args.output).resolve()
    oracle = str(Path(args.oracle).resolve()) if args.oracle else None
    invocation = {"samples": str(samples_dir), "oracle": oracle}
    prepare_run_dir(run_dir, run_config_text(config, invocation))
    # Ray's environment is set before anything imports Ray.
    ray_environment(config)
    from train.pipeline import run_pipeline
    from train.stage import verify_resume_checkpoints

    logging.getLogger("ray").setLevel(logging.WARNING)  # as the ray.init below will set it
    # A resume from a damaged checkpoint fails here, naming the file, before Ray starts.
    verify_resume_checkpoints(pipeline(config["model"]), run_dir)
    with ray_session(config):
        return run_pipeline(config, samples_dir, run_dir, oracle)


def cli() -> None:
    """The command line, also installed as `mkt-train` (pyproject.toml)."""
    try:
        main()
    except (ConfigError, SchemaError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except (CheckpointError, NonFiniteLossError) as e:
        sys.exit(f"error: {type(e).__name__}: {e}")


if __name__ == "__main__":
    cli()
