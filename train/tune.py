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

import sys
from pathlib import Path

if __package__ in (None, ""):
    # Run as a script (also from a `ray job submit` working dir): import this checkout's code.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
from collections.abc import Iterable, Mapping
from typing import Any

from mkt.pipelines import pipeline
from mkt.schema import SchemaError
from train.cluster import start_ray
from train.config import (
    DEFAULT_CONFIG,
    EARLY_STOPPING_METRICS,
    REPO_ROOT,
    ConfigError,
    check,
    dump,
    load_yaml,
    merge,
    parse_overrides,
)
from train.run import check_samples, check_stage_params, prepare_run_dir

DEFAULT_SWEEP_CONFIG = REPO_ROOT / "conf" / "tune" / "default.yaml"
# Search-space entries: `{kind: arguments}`; see conf/tune/default.yaml.
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")
# Exit status of an interrupted sweep (as a shell reports Ctrl-C).
INTERRUPTED = 130


def load_sweep_config(
    config_path: str | Path | None = None, overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """conf/tune/default.yaml, then the file, then the overrides; `run` resolved into a whole
    run config (conf/run/default.yaml under every layer's `run`), all checked."""
    sweep = load_yaml(DEFAULT_SWEEP_CONFIG)
    run_layers = [(sweep.pop("run"), str(DEFAULT_SWEEP_CONFIG))]
    layers = [(load_yaml(config_path), str(config_path))] if config_path is not None else []
    layers.append((parse_overrides(overrides), "override"))
    for layer, origin in layers:
        layer = dict(layer)
        if "run" in layer:
            run_layers.append((layer.pop("run"), origin))
        if "search_space" in layer:
            # Replaced, not merged: a file naming its own space must not inherit the default's.
            space = layer.pop("search_space")
            if not isinstance(space, Mapping) or not space:
                raise ConfigError(f"{origin}: 'search_space' must be a non-empty mapping")
            sweep["search_space"] = dict(space)
        sweep = merge(sweep, layer, origin)
    run = load_yaml(DEFAULT_CONFIG)
    for layer, origin in run_layers:
        if layer is None:
            continue
        if not isinstance(layer, Mapping):
            raise ConfigError(f"{origin}: 'run' must be a mapping of run-config keys")
        run = merge(run, layer, f"{origin}, under 'run'")
    check(run)
    sweep["run"] = run
    check_sweep(sweep)
    return sweep


def max_reports(sweep: Mapping[str, Any]) -> int:
    """The most reports a trial can make: one per epoch of every stage, then the pipeline's
    (with the most stages and epochs any search-space value gives `model` or `train.epochs`)."""
    configs = [sweep["run"]] + [
        trial_run_config(sweep["run"], {key: value}, sweep["metric"])
        for key, spec in sweep["search_space"].items()
        for value in _values_to_check(key, spec)
    ]
    stages = max(len(pipeline(c["model"])) for c in configs)
    return stages * max(c["train"]["epochs"] for c in configs) + 1


def check_sweep(sweep: Mapping[str, Any]) -> None:
    """Value checks, and every search-space value tried on the run config (so a typo in a key
    or a value a model rejects fails here, before Ray starts)."""
    try:
        check_stage_params(sweep["run"])
    except ValueError as e:  # the run config's ConfigError, or a model's
        raise ConfigError(f"run: {e}") from e
    if sweep["metric"] not in EARLY_STOPPING_METRICS:
        raise ConfigError(f"metric: {sweep['metric']!r} is not one of {EARLY_STOPPING_METRICS}")
    if not isinstance(sweep["num_samples"], int) or sweep["num_samples"] < 1:
        raise ConfigError("num_samples: must be an integer >= 1")
    scheduler = sweep["scheduler"]
    if scheduler["name"] not in SCHEDULERS:
        raise ConfigError(f"scheduler.name: {scheduler['name']!r} is not one of {SCHEDULERS}")
    if scheduler["grace_period"] < 1:
        raise ConfigError("scheduler.grace_period: must be >= 1")
    if scheduler["reduction_factor"] <= 1:
        raise ConfigError("scheduler.reduction_factor: must be > 1")
    concurrent = sweep["max_concurrent_trials"]
    if concurrent is not None and (not isinstance(concurrent, int) or concurrent < 1):
        raise ConfigError("max_concurrent_trials: null or an integer >= 1")
    if sweep["stage1_cache"] is not None and not isinstance(sweep["stage1_cache"], str):
        raise ConfigError("stage1_cache: null or a directory path")
    drill = sweep["fault"]["interrupt_after_trials"]
    if drill is not None and (not isinstance(drill, int) or drill < 1):
        raise ConfigError("fault.interrupt_after_trials: null or a number of trials >= 1")
    for key, spec in sweep["search_space"].items():
        for value in _values_to_check(key, spec):
            try:
                check_stage_params(trial_run_config(sweep["run"], {key: value}, sweep["metric"]))
            except ValueError as e:  # the run config's ConfigError, or a model's
                raise ConfigError(f"search_space.{key} = {value!r}: {e}") from e
    if sweep["num_samples"] > 1 and all("grid" in spec for spec in sweep["search_space"].values()):
        raise ConfigError(
            f"num_samples: {sweep['num_samples']} repeats of a grid-only search space would be "
            "the same runs (same seed, one shared stage 1); sweep the seed in the grid instead "
            "(search_space seed: {grid: [0, 1, 2]}), or sample a distribution"
        )
    if scheduler["grace_period"] > max_reports(sweep):
        raise ConfigError(
            f"scheduler.grace_period: {scheduler['grace_period']} is more than the "
            f"{max_reports(sweep)} reports a trial makes (an epoch of each stage, then the "
            "pipeline's score)"
        )


def _values_to_check(key: str, spec: Any) -> list[Any]:
    """The values a trial may get from one search-space entry: all of a list, the ends of a
    range."""
    where = f"search_space.{key}"
    if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
        raise ConfigError(
            f"{where}: expected one of {{{', '.join(DISTRIBUTIONS)}: ...}}, got {spec!r}"
        )
    kind, args = next(iter(spec.items()))
    if kind in ("grid", "choice"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}.{kind}: a non-empty list of values")
        return args
    if (
        not isinstance(args, list)
        or len(args) != 2
        or not all(isinstance(a, int | float) and not isinstance(a, bool) for a in args)
        or not args[0] < args[1]
    ):
        raise ConfigError(f"{where}.{kind}: [low, high] with low < high, got {args!r}")
    if kind == "loguniform" and args[0] <= 0:
        raise ConfigError(f"{where}.loguniform: low must be > 0 (put 0 in a grid or choice)")
    if kind == "randint":
        if not all(isinstance(a, int) for a in args):
            raise ConfigError(f"{where}.randint: integer bounds, got {args!r}")
        return [args[0], args[1] - 1]
    return list(args)


def trial_run_config(
    base: Mapping[str, Any], assignments: Mapping[str, Any], metric: str
) -> dict[str, Any]:
    """A trial's run config: `base`, then its values (dotted run-config keys), then the sweep's
    metric as the early-stopping metric of every stage."""
    layer: dict[str, Any] = {}
    for key, value in assignments.items():
        *parents, name = key.split(".")
        node = layer
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
    config = merge(base, layer, "search_space")
    config["train"]["early_stopping"]["metric"] = metric
    check(config)
    return config


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
    check_samples(samples_dir)
    output = Path(args.output).resolve()
    oracle = str(Path(args.oracle).resolve()) if args.oracle else None
    if sweep["stage1_cache"] is not None:
        sweep["stage1_cache"] = str(Path(sweep["stage1_cache"]).resolve())
    invocation = {"samples": str(samples_dir), "oracle": oracle}
    prepare_run_dir(output, dump({"invocation": invocation, **sweep}))
    started_here = start_ray(sweep["run"])
    # Imported only now: start_ray must set up the environment before Ray is first imported.
    import ray

    from train.sweep import run_sweep

    try:
        return run_sweep(sweep, samples_dir, output, oracle)
    finally:
        if started_here:
            ray.shutdown()


if __name__ == "__main__":
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
