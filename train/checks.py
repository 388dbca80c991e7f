"""What a run checks and writes before any cluster starts: stage parameters against the
models that take them, the resolved config (defaults included) and RUN_DIR/config.yaml. Shared
by train/run.py, train/tune.py and the tables job."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from mkt.contract import ConfigError
from mkt.models import MODELS
from mkt.models.base import resolve_params
from mkt.pipelines import PIPELINES, pipeline
from train.config import code_commit, dump

CONFIG_FILE = "config.yaml"


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
