"""Run configuration: `conf/run/default.yaml`, then a run config file, then `key=value`.

Every key must exist in the defaults (a typo fails with the key's name) and keep the type of its
default; the subtree `params.<stage>` is free-form here and checked by the model it belongs to
(`mkt.models.build_model`). This module imports neither Ray nor torch, so `train/run.py` can
read the config before it decides how to start Ray.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import subprocess
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from mkt.config_file import check_typed, check_value, describe, read_config_file
from mkt.contract import ConfigError
from train.cluster import cluster_address
from train.faults import RUN_FAULTS, RunFaults, check_fault

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "conf" / "run" / "default.yaml"
EARLY_STOPPING_METRICS = ("auc", "gauc")


def load_yaml(path: str | Path) -> dict[str, Any]:
    return read_config_file(path, "run config")


def parse_overrides(items: Iterable[str]) -> dict[str, Any]:
    """`["train.lr=0.01", "params.mem.gamma=0"]` -> a nested mapping; values are YAML."""
    nested: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from e
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} was already set to a value")
            node = child
        node[parts[-1]] = value
    return nested


@dataclass(frozen=True)
class EarlyStopping:
    metric: Literal["auc", "gauc"]
    patience: int
    plateau_lr_factor: float


@dataclass(frozen=True)
class Train:
    epochs: int
    batch_size: int
    lr: float
    embedding_lr: float | None
    wide_lr: float | None
    weight_decay: float
    embedding_l2: float
    embedding_l2_warmup_steps: int
    sparse_embeddings: bool
    sparse_min_rows: int
    item_attributes: bool
    tem_holdout: float
    early_stopping: EarlyStopping
    shuffle_buffer_rows: int
    read_tasks_per_stream: int
    cache_max_rows: int
    read_block_bytes: int | None
    eval_batch_size: int
    progress_every_batches: int
    find_unused_parameters: bool


@dataclass(frozen=True)
class Scaling:
    num_workers: int
    cpus_per_worker: float
    use_gpu: Literal["auto"] | bool
    torch_threads: int


@dataclass(frozen=True)
class Ray:
    address: str | None
    num_cpus: int
    max_failures: int


@dataclass(frozen=True)
class Eval:
    activity_boundaries: list[float]
    driver_scoring_rows: int


@dataclass(frozen=True)
class Tracking:
    mlflow_uri: str | None
    mlflow_experiment: str


@dataclass(frozen=True)
class RunConfig:
    """What a run config holds: its keys and their types. The defaults, each documented, are
    conf/run/default.yaml (and train/faults.py's for `fault`); loading checks the two agree."""

    model: str
    seed: int
    params: dict[str, dict[str, Any]]  # per stage; each model checks its own keys
    train: Train
    scaling: Scaling
    ray: Ray
    eval: Eval
    tracking: Tracking
    fault: RunFaults


def merge(
    base: Mapping[str, Any], layer: Mapping[str, Any], origin: str, declared: type = RunConfig
) -> dict[str, Any]:
    """`layer` over `base`: every key of `layer` must be declared by the dataclass `declared`
    (free-form below a `dict[...]` field such as `params`) and hold a value of its type."""
    merged = copy.deepcopy(dict(base))
    _merge_into(merged, layer, origin, (), declared)
    return merged


def _merge_into(
    into: dict[str, Any],
    layer: Mapping[str, Any],
    origin: str,
    path: tuple[str, ...],
    declared: Any,
) -> None:
    hints = typing.get_type_hints(declared) if dataclasses.is_dataclass(declared) else None
    for key, value in layer.items():
        where = ".".join((*path, str(key)))
        if hints is None:  # free-form: the model behind `params.<stage>` checks its keys
            if isinstance(into.get(key), dict) and isinstance(value, Mapping):
                _merge_into(into[key], value, origin, (*path, str(key)), None)
            else:
                into[key] = copy.deepcopy(value)
            continue
        if key not in hints:
            raise ConfigError(f"{origin}: unknown key {where!r}")
        hint = hints[key]
        if dataclasses.is_dataclass(hint) or typing.get_origin(hint) is dict:
            if value is None:
                value = {}
            if not isinstance(value, Mapping):
                raise ConfigError(f"{origin}: {where!r} must be a mapping, got {value!r}")
            free = None if typing.get_origin(hint) is dict else hint
            _merge_into(into.setdefault(key, {}), value, origin, (*path, str(key)), free)
            continue
        try:
            check_value(hint, value, where)
        except ConfigError:
            raise ConfigError(
                f"{origin}: {where!r} expects {describe(hint)}, got {value!r}"
            ) from None
        into[key] = copy.deepcopy(value)


def load_run_config(
    config_path: str | Path | None = None, overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """Defaults, then the config file (if any), then the overrides; checked."""
    config = run_defaults()
    if config_path is not None:
        config = merge(config, load_yaml(config_path), str(config_path))
    config = merge(config, parse_overrides(overrides), "override")
    check(config)
    return config


def run_defaults() -> dict[str, Any]:
    """conf/run/default.yaml with the fault drills' defaults (all off): a value for every key
    RunConfig declares."""
    config = merge({}, load_yaml(DEFAULT_CONFIG), str(DEFAULT_CONFIG))
    config = merge(config, {"fault": RUN_FAULTS}, "train/faults.py")
    check_typed(RunConfig, config)
    return config


def check(config: Mapping[str, Any]) -> None:
    """Value checks the type comparison cannot make."""
    train = config["train"]
    if not isinstance(config["model"], str) or not config["model"]:
        raise ConfigError("model: a pipeline or model name is required")
    keys = ("epochs", "batch_size", "eval_batch_size", "progress_every_batches")
    for key in (*keys, "read_tasks_per_stream"):
        if train[key] < 1:
            raise ConfigError(f"train.{key}: must be >= 1, got {train[key]}")
    if train["lr"] <= 0:
        raise ConfigError(f"train.lr: must be > 0, got {train['lr']}")
    for key in ("embedding_lr", "wide_lr"):
        step = train[key]
        if step is not None and (
            isinstance(step, bool) or not isinstance(step, int | float) or step <= 0
        ):
            raise ConfigError(f"train.{key}: null or a number > 0, got {step!r}")
    for key in ("weight_decay", "embedding_l2"):
        if train[key] < 0:
            raise ConfigError(f"train.{key}: must be >= 0, got {train[key]}")
    if not 0.0 <= train["tem_holdout"] < 1.0:
        raise ConfigError(f"train.tem_holdout: must be in [0, 1), got {train['tem_holdout']}")
    block = train["read_block_bytes"]
    if block is not None and block < 1 << 20:
        raise ConfigError(f"train.read_block_bytes: null or at least 1 MiB, got {block}")
    for key in (
        "shuffle_buffer_rows",
        "cache_max_rows",
        "sparse_min_rows",
        "embedding_l2_warmup_steps",
    ):
        if train[key] < 0:
            raise ConfigError(f"train.{key}: must be >= 0 (0 turns it off), got {train[key]}")
    stopping = train["early_stopping"]
    if stopping["metric"] not in EARLY_STOPPING_METRICS:
        raise ConfigError(
            f"train.early_stopping.metric: {stopping['metric']!r} is not one of "
            f"{EARLY_STOPPING_METRICS}"
        )
    if stopping["patience"] < 1:
        raise ConfigError("train.early_stopping.patience: must be >= 1")
    if not 0.0 < stopping["plateau_lr_factor"] <= 1.0:
        raise ConfigError(
            "train.early_stopping.plateau_lr_factor: must be in (0, 1] (1 turns it off), "
            f"got {stopping['plateau_lr_factor']}"
        )
    scaling = config["scaling"]
    if scaling["num_workers"] < 1:
        raise ConfigError("scaling.num_workers: must be >= 1")
    if scaling["cpus_per_worker"] <= 0:
        raise ConfigError("scaling.cpus_per_worker: must be > 0")
    if scaling["torch_threads"] < 1:
        raise ConfigError("scaling.torch_threads: must be >= 1")
    # ray.num_cpus sizes the embedded Ray only; a cluster that is joined brings its own CPUs.
    needed = scaling["num_workers"] * scaling["cpus_per_worker"]
    if cluster_address(config) is None and config["ray"]["num_cpus"] < needed:
        raise ConfigError(
            "ray.num_cpus: smaller than scaling.num_workers * scaling.cpus_per_worker; "
            "the workers could never be placed"
        )
    if config["ray"]["max_failures"] < 0:
        raise ConfigError("ray.max_failures: must be >= 0")
    bounds = config["eval"]["activity_boundaries"]
    if not bounds or any(not isinstance(b, int | float) for b in bounds):
        raise ConfigError("eval.activity_boundaries: a non-empty list of numbers")
    if config["eval"]["driver_scoring_rows"] < 0:
        raise ConfigError("eval.driver_scoring_rows: must be >= 0")
    for stage, params in config["params"].items():
        if not isinstance(params, Mapping):
            raise ConfigError(f"params.{stage}: must be a mapping of model parameters")
    for key in ("ray.address", "tracking.mlflow_uri"):
        section, name = key.split(".")
        if config[section][name] is not None and not isinstance(config[section][name], str):
            raise ConfigError(f"{key}: null or a string, got {config[section][name]!r}")
    if config["tracking"]["mlflow_uri"] and importlib.util.find_spec("mlflow") is None:
        raise ConfigError(
            f"tracking.mlflow_uri is set ({config['tracking']['mlflow_uri']}) but mlflow is not "
            "installed: `pip install -e '.[mlflow]'` (the pinned extra), or leave "
            "tracking.mlflow_uri null"
        )
    check_fault(config)


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A config as flat `a.b.c` parameters (TensorBoard hparams, MLflow params); values other
    than numbers, strings and booleans as their text."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value if isinstance(value, int | float | str | bool) else str(value)
    return flat


def dump(config: Mapping[str, Any]) -> str:
    return yaml.safe_dump(dict(config), sort_keys=False, default_flow_style=None)


def code_commit(repo: Path = REPO_ROOT) -> str | None:
    """HEAD's commit of the git checkout holding this code; None when the code is not a git
    checkout or git is unavailable. (Uncommitted changes are not recorded.)"""
    if not (repo / ".git").exists():
        return None
    try:
        head = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "--verify", "HEAD"],
            capture_output=True,
            text=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    commit = head.stdout.strip()
    return commit if head.returncode == 0 and commit else None
