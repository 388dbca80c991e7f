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

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (also from a `ray job submit` working dir): import this checkout's code.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
from typing import Any

import yaml

from mkt.models import MODELS
from mkt.models.base import resolve_params
from mkt.pipelines import PIPELINES, pipeline
from mkt.schema import FeatureSchema, SchemaError
from train.checkpoints import CheckpointError
from train.cluster import start_ray
from train.config import ConfigError, code_commit, dump, load_run_config
from train.errors import NonFiniteLossError

CONFIG_FILE = "config.yaml"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, help="OUT_DIR of etl/build_samples.py")
    parser.add_argument("--output", required=True, help="RUN_DIR for this run's files")
    parser.add_argument("--config", help="run config YAML laid over conf/run/default.yaml")
    parser.add_argument("--oracle", help="oracle.parquet (default: beside the raw input)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    return parser.parse_args(argv)


def check_stage_params(config: dict[str, Any]) -> None:
    """Fail before Ray starts on parameters no stage takes, or a model would reject."""
    known = {s.name for stages in PIPELINES.values() for s in stages} | set(MODELS)
    for name in config["params"]:
        if name not in known:
            raise ConfigError(f"params.{name}: not a stage or model name; known: {sorted(known)}")
    try:
        stages = pipeline(config["model"])
    except ValueError as e:
        raise ConfigError(str(e)) from e
    for stage in stages:
        params = config["params"].get(stage.name, {})
        try:
            resolve_params(MODELS[stage.model], params)
        except ValueError as e:
            raise ConfigError(f"params.{stage.name}: {e}") from e


def resolved_config(config: dict[str, Any]) -> dict[str, Any]:
    """The run config with every stage of its pipeline holding all its model parameters,
    defaults included, so that config.yaml and metrics.json say everything that ran."""
    params = dict(config["params"])
    for stage in pipeline(config["model"]):
        params[stage.name] = resolve_params(MODELS[stage.model], params.get(stage.name, {}))
    return {**config, "params": params}


def run_config_text(config: dict[str, Any], invocation: dict[str, Any]) -> str:
    """What RUN_DIR/config.yaml holds: the invocation, the code commit, the resolved config."""
    return dump({"invocation": invocation, "code_commit": code_commit(), **config})


def check_samples(samples_dir: Path) -> None:
    """OUT_DIR must hold what etl/build_samples.py writes: the schema file and the table."""
    FeatureSchema.load(samples_dir)
    if not (samples_dir / "samples" / "_delta_log").is_dir():
        raise ConfigError(
            f"{samples_dir / 'samples'}: not a Delta table (run etl/build_samples.py)"
        )


def prepare_run_dir(run_dir: Path, resolved: str) -> None:
    """Write the resolved config; an existing RUN_DIR must hold the same one (a resume; the
    code commit may differ, e.g. after a fix: the file keeps the first)."""
    path = run_dir / CONFIG_FILE
    if path.exists():
        if _without_commit(path.read_text()) != _without_commit(resolved):
            raise ConfigError(
                f"{run_dir}: holds a run with another config ({path}); choose another --output "
                "or delete that directory"
            )
        return
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(resolved)


def _without_commit(text: str) -> Any:
    data = yaml.safe_load(text)
    if isinstance(data, dict):
        data.pop("code_commit", None)
    return data


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    config = load_run_config(args.config, args.overrides)
    check_stage_params(config)
    config = resolved_config(config)
    samples_dir = Path(args.samples).resolve()
    check_samples(samples_dir)
    run_dir = Path(args.output).resolve()
    oracle = str(Path(args.oracle).resolve()) if args.oracle else None
    invocation = {"samples": str(samples_dir), "oracle": oracle}
    prepare_run_dir(run_dir, run_config_text(config, invocation))
    started_here = start_ray(config)
    # Imported only now: start_ray must set up the environment before Ray is first imported.
    import ray

    from train.pipeline import run_pipeline

    try:
        return run_pipeline(config, samples_dir, run_dir, oracle)
    finally:
        if started_here:
            ray.shutdown()


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, SchemaError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    except (CheckpointError, NonFiniteLossError) as e:
        sys.exit(f"error: {type(e).__name__}: {e}")
