"""The sweep config (conf/tune/*.yaml): loading, checking, and each trial's run config.
Checked in full before Ray starts, so that a bad key fails in a second, not after a trial."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from mkt.config_file import check_typed
from mkt.contract import ConfigError
from mkt.pipelines import pipeline
from train.checks import check_stage_params
from train.config import (
    EARLY_STOPPING_METRICS,
    REPO_ROOT,
    check,
    load_yaml,
    merge,
    parse_overrides,
    run_defaults,
)
from train.faults import SWEEP_FAULTS, SweepFaults

DEFAULT_SWEEP_CONFIG = REPO_ROOT / "conf" / "tune" / "default.yaml"
# Search-space entries: `{kind: arguments}`; see conf/tune/default.yaml.
DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")
SCHEDULERS = ("asha", "fifo")


@dataclass(frozen=True)
class Scheduler:
    name: Literal["asha", "fifo"]
    grace_period: int
    reduction_factor: float


@dataclass(frozen=True)
class SweepConfig:
    """What a sweep config holds besides `run` (a run config, RunConfig): its keys and their
    types. The defaults, each documented, are conf/tune/default.yaml."""

    search_space: dict[str, dict[str, Any]]  # dotted run-config key -> {distribution: args}
    metric: Literal["auc", "gauc"]
    num_samples: int
    scheduler: Scheduler
    max_concurrent_trials: int | None
    stage1_cache: str | None
    fault: SweepFaults


def load_sweep_config(
    config_path: str | Path | None = None, overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """conf/tune/default.yaml, then the file, then the overrides; `run` resolved into a whole
    run config (the run defaults under every layer's `run`), all checked."""
    defaults = load_yaml(DEFAULT_SWEEP_CONFIG)
    run_layers = [(defaults.pop("run", None), str(DEFAULT_SWEEP_CONFIG))]
    sweep = merge({}, defaults, str(DEFAULT_SWEEP_CONFIG), SweepConfig)
    sweep = merge(sweep, {"fault": SWEEP_FAULTS}, "train/faults.py", SweepConfig)
    check_typed(SweepConfig, sweep)
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
        sweep = merge(sweep, layer, origin, SweepConfig)
    run = run_defaults()
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
    """The most reports a trial can make: one per epoch of every stage, one before the first
    epoch of every stage built on another (train.loop scores its start), then the pipeline's
    (with the most stages and epochs any search-space value gives `model` or
    `train.epochs`)."""
    configs = [sweep["run"]] + [
        trial_run_config(sweep["run"], {key: value}, sweep["metric"])
        for key, spec in sweep["search_space"].items()
        for value in _values_to_check(key, spec)
    ]
    epochs = max(c["train"]["epochs"] for c in configs)
    return (
        max(sum(epochs + bool(stage.built_on) for stage in pipeline(c["model"])) for c in configs)
        + 1
    )


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
            f"{max_reports(sweep)} reports a trial makes (an epoch of each stage, a later "
            "stage's start, then the pipeline's score)"
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


def expected_trials(sweep: Mapping[str, Any]) -> int:
    grid = math.prod(len(spec["grid"]) for spec in sweep["search_space"].values() if "grid" in spec)
    return grid * sweep["num_samples"]
