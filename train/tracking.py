"""MLflow tracking of runs and sweeps (`tracking.mlflow_uri`), with mlflow's client API.

Not Ray's `MLflowLoggerCallback`: it sees a Tune trial's config and reports, while a run's test
metrics and curves.png come after its stages, and a sweep's trial runs its stages without a
Tune trial of their own. In the experiment `tracking.mlflow_experiment`:

- a train/run.py run (one RUN_DIR): one MLflow run, named after RUN_DIR, with the resolved
  config as parameters (dotted keys, as `key=value` overrides name them), the target test
  metrics of the model and of the reference scorers, and RUN_DIR's curves.png, summary.md,
  metrics.json and config.yaml as artifacts;
- nested under it, one MLflow run per stage, logged when the stage has finished: its model
  parameters and every number of every epoch's report (step = epoch);
- a sweep (train/tune.py): one MLflow run for the sweep (its config as parameters; summary.md,
  trials.csv, metric.png and best_config.yaml as artifacts), each trial's run nested under it,
  and trials the scheduler stopped marked KILLED with their last score.

The MLflow run ids are kept in RUN_DIR/mlflow.json (SWEEP_DIR/mlflow.json), so a resumed run
or sweep goes on logging into the same MLflow runs. mlflow is imported only when tracking is on
(the config check names it when it is missing).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from train.config import flatten

IDS_FILE = "mlflow.json"
PARENT_TAG = "mlflow.parentRunId"  # what MLflow nests runs by
# The run's files that go to MLflow as artifacts (those that exist).
RUN_ARTIFACTS = ("curves.png", "summary.md", "metrics.json", "config.yaml")
SWEEP_ARTIFACTS = ("summary.md", "trials.csv", "metric.png", "best_config.yaml")
TEST_METRICS = ("auc", "gauc", "gauc_coverage", "logloss")
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call


def _client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    if uri.startswith("file:") or "://" not in uri:
        # MLflow 3 refuses its file store (in maintenance) unless told; it needs no server or
        # database, and `mlflow ui --backend-store-uri file://...` reads it.
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return MlflowClient(tracking_uri=uri)


def _experiment_id(client: Any, name: str) -> str:
    """The experiment's id, created if missing (a sweep's trials may race to create it)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        return client.get_experiment_by_name(name).experiment_id


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The numbers of a report as metrics: text (a sweep trial's `stage1`) is none, and NaN
    (a GAUC without a user of both labels) is left out, as metrics.json leaves it null."""
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    }


def _log(
    client: Any,
    run_id: str,
    metrics: Mapping[str, float] | None = None,
    params: Mapping[str, Any] | None = None,
    step: int = 0,
) -> None:
    from mlflow.entities import Metric, Param

    client.log_batch(run_id, metrics=[Metric(k, v, 0, step) for k, v in (metrics or {}).items()])
    items = [Param(k, str(v)) for k, v in (params or {}).items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])


class Tracker:
    """The MLflow run of one RUN_DIR (or SWEEP_DIR), and its nested stage runs."""

    def __init__(self, client: Any, directory: Path, ids: dict[str, Any]) -> None:
        self.client = client
        self.directory = directory
        self.ids = ids

    @classmethod
    def open(
        cls,
        tracking: Mapping[str, Any],
        directory: Path,
        params: Mapping[str, Any],
        tags: Mapping[str, str],
        parent: str | None = None,
    ) -> Tracker | None:
        """The directory's MLflow run, started (with `params`) unless mlflow.json names one;
        None when tracking is off."""
        if not tracking["mlflow_uri"]:
            return None
        client = _client(tracking["mlflow_uri"])
        path = directory / IDS_FILE
        if path.is_file():
            ids = json.loads(path.read_text())
            client.update_run(ids["run"], status="RUNNING")
            return cls(client, directory, ids)
        run = client.create_run(
            _experiment_id(client, tracking["mlflow_experiment"]),
            run_name=directory.name,
            tags={**tags, "run_dir": str(directory), **({PARENT_TAG: parent} if parent else {})},
        )
        tracker = cls(client, directory, {"run": run.info.run_id, "stages": {}})
        _log(client, tracker.run_id, params=flatten(params))
        tracker._save()
        return tracker

    @property
    def run_id(self) -> str:
        return self.ids["run"]

    def _save(self) -> None:
        partial = self.directory / f"{IDS_FILE}.tmp"
        partial.write_text(json.dumps(self.ids, indent=1) + "\n")
        partial.replace(self.directory / IDS_FILE)

    def log_stage(
        self, name: str, model: str, params: Mapping[str, Any], history: Iterable[Mapping]
    ) -> None:
        """A finished stage as a nested run (once: a resumed run does not log it again)."""
        if name in self.ids["stages"]:
            return
        run = self.client.create_run(
            self.client.get_run(self.run_id).info.experiment_id,
            run_name=f"{self.directory.name}/{name}",
            tags={PARENT_TAG: self.run_id, "stage": name, "model": model},
        )
        stage_id = run.info.run_id
        _log(self.client, stage_id, params={"model": model, **flatten(params)})
        for report in history:
            _log(self.client, stage_id, _numbers(report), step=int(report["epoch"]))
        self.client.set_terminated(stage_id)
        self.ids["stages"][name] = stage_id
        self._save()

    def log(self, metrics: Mapping[str, Any], artifacts: Iterable[str]) -> None:
        """Numbers of the whole run, and those of the directory's files that exist."""
        _log(self.client, self.run_id, _numbers(metrics))
        for name in artifacts:
            if (self.directory / name).is_file():
                self.client.log_artifact(self.run_id, str(self.directory / name))

    def end(self, status: str) -> None:
        """FINISHED, FAILED or KILLED; a resumed run reopens it (`open`)."""
        self.client.set_terminated(self.run_id, status=status)


def flat_test_metrics(test: Mapping[str, Any]) -> dict[str, float]:
    """metrics.json's `test` as flat MLflow metrics: `test_auc`, ... of the model,
    `test_<scorer>_auc`, ... of the reference scorers (like_rate, oracle)."""
    flat = {}
    for scorer, values in test.items():
        prefix = "test" if scorer == "model" else f"test_{scorer}"
        flat.update({f"{prefix}_{k}": values[k] for k in TEST_METRICS if k in values})
    return _numbers(flat)


def end_unfinished(
    tracking: Mapping[str, Any], run_dir: Path, status: str, metrics: Mapping[str, float]
) -> None:
    """Mark the MLflow run of a trial that will not finish (stopped by the scheduler, or
    failed) as such, with its last numbers; nothing when it has none."""
    path = run_dir / IDS_FILE
    if not tracking["mlflow_uri"] or not path.is_file():
        return
    client = _client(tracking["mlflow_uri"])
    run_id = json.loads(path.read_text())["run"]
    _log(client, run_id, _numbers(metrics))
    client.set_terminated(run_id, status=status)
