"""Run one pipeline stage: a Ray Train `TorchTrainer` over the streamed samples.

The trainer runs inside a one-trial Ray Tune experiment for one reason: Train V2 has no
TensorBoard integration of its own, and Tune's logger callbacks are Ray's. Train's
`TuneReportCallback` hands every epoch's report to the trial, and Tune's `TBXLoggerCallback`
records it (MLflow is logged by train.tracking). Checkpoints, restarts and early stopping are
Train's and the loop's; Tune adds no retries of its own.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray import tune
from ray.train import Result
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.logger import TBXLoggerCallback
from ray.tune.trainable.trainable_fn_utils import _in_tune_session

from mkt.pipelines import Stage
from mkt.schema import FeatureSchema
from train.checkpoints import ModelLink, TrainState
from train.config import flatten
from train.data import (
    entity_rows,
    model_columns,
    read_samples,
    stage_entities,
    stage_target_share,
    target_rows_filter,
    train_dataset_name,
)
from train.loop import SCORE, STAGE_ERRORS, stage_worker

CHECKPOINTS_DIR = "checkpoints"
TENSORBOARD_DIR = "tensorboard"
# The Tune trial only waits on the trainer; a sliver of a CPU keeps it from taking a core from
# the workers or the data path (Tune refuses an empty resource request).
TRIAL_RESOURCES = {"CPU": 0.01}


@dataclass(frozen=True)
class StageResult:
    name: str
    link: ModelLink  # the stage's model with its best checkpoint's weights
    state: TrainState  # from the latest checkpoint: history and early-stopping state
    best_metrics: dict[str, Any]


def use_gpu(config: dict[str, Any]) -> bool:
    choice = config["scaling"]["use_gpu"]
    if choice == "auto":
        return ray.cluster_resources().get("GPU", 0) > 0
    return bool(choice)


def worker_config(
    stage: Stage,
    config: dict[str, Any],
    schema: FeatureSchema,
    chain: list[ModelLink],
    run_dir: Path,
    rows: dict[str, int],
) -> dict[str, Any]:
    """Everything `stage_worker` needs, as plain data (it crosses process boundaries)."""
    return {
        "stage": stage.name,
        "train_rows": rows,
        "schema": schema.to_dict(),
        "chain": [link.to_dict() for link in chain],
        "train": config["train"],
        "seed": config["seed"],
        "torch_threads": config["scaling"]["torch_threads"],
        "fault": {
            **config["fault"],
            "marker": str(run_dir / f".fault-drill-{stage.name}"),
            "storage": str(run_dir / CHECKPOINTS_DIR / stage.name),
        },
        "error_file": str(error_file(run_dir, stage)),
    }


def error_file(run_dir: Path, stage: Stage) -> Path:
    """Where a worker leaves the error that ended the stage without retries (train.loop)."""
    return run_dir / f".error-{stage.name}.json"


def raise_stage_error(path: Path) -> None:
    """Raise the error a worker ended the stage with, if any, as its own exception class."""
    if not path.is_file():
        return
    error = json.loads(path.read_text())
    raise STAGE_ERRORS[error["kind"]](error["message"])


def stage_datasets(
    stage: Stage,
    schema: FeatureSchema,
    samples_dir: Path,
    rows: dict[str, int],
    seed: int,
    read_tasks: int,
    holdout: float,
) -> dict[str, ray.data.Dataset]:
    """A train stream per entity with rows (see train.data on mixing them; the target's
    limited to the stage's `target_rows`), and the validation rows of the entity the stage
    serves: the target, unless the stage trains on the source alone (a Finetune pre-training)."""
    valid_entity = schema.source_entity if stage.entities == "source" else schema.target_entity
    columns = model_columns(schema)
    target_filter = target_rows_filter(schema, stage.target_rows, holdout)
    datasets = {
        train_dataset_name(entity): read_samples(
            samples_dir,
            schema,
            [entity],
            "train",
            columns,
            seed,
            read_tasks,
            rows=target_filter if entity == schema.target_entity else None,
        )
        for entity, n in rows.items()
        if n > 0
    }
    datasets["valid"] = read_samples(
        samples_dir,
        schema,
        [valid_entity],
        "valid",
        [*columns, schema.columns["user_key"]],
        read_tasks=read_tasks,
    )
    return datasets


def finished(stage: Stage, config: dict[str, Any], run_dir: Path) -> StageResult | None:
    """The result of a stage an earlier invocation with this RUN_DIR already completed."""
    path = run_dir / CHECKPOINTS_DIR / stage.name
    if not path.is_dir():
        return None
    try:
        result = Result.from_path(str(path))
    except RuntimeError:
        return None
    if result.checkpoint is None:
        return None
    state = TrainState.load(Path(result.checkpoint.path))
    if not (state.stopped_early or state.epochs_done >= config["train"]["epochs"]):
        return None
    return _stage_result(stage, config, result, state)


def run_stage(
    stage: Stage,
    config: dict[str, Any],
    schema: FeatureSchema,
    samples_dir: Path,
    run_dir: Path,
    chain: list[ModelLink],
) -> StageResult:
    """Train `chain[-1]` (this stage's model, on `chain[:-1]`) and return its best weights."""
    gpu = use_gpu(config)
    scaling = config["scaling"]
    resources = {"CPU": scaling["cpus_per_worker"], **({"GPU": 1} if gpu else {})}
    share = stage_target_share(stage.target_rows, config["train"]["tem_holdout"])
    rows = {
        entity: round(
            entity_rows(samples_dir, schema, entity, "train")
            * (share if entity == schema.target_entity else 1.0)
        )
        for entity in stage_entities(schema, stage.entities)
    }
    train_loop_config = worker_config(stage, config, schema, chain, run_dir, rows)
    print(
        f"[{stage.name}] start: {stage.model}, {', '.join(f'{n} {e}' for e, n in rows.items())} "
        f"train rows, {scaling['num_workers']} worker(s) x {scaling['cpus_per_worker']} CPU"
        f"{' + 1 GPU' if gpu else ''}, up to {config['train']['epochs']} epochs",
        flush=True,
    )
    storage = str(run_dir / CHECKPOINTS_DIR)
    errors = error_file(run_dir, stage)
    errors.unlink(missing_ok=True)  # an earlier invocation's; this one starts afresh

    def fit(_: dict[str, Any]) -> None:
        trainer = TorchTrainer(
            stage_worker,
            train_loop_config=train_loop_config,
            torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
            scaling_config=ray.train.ScalingConfig(
                num_workers=scaling["num_workers"],
                use_gpu=gpu,
                resources_per_worker=resources,
            ),
            datasets=stage_datasets(
                stage,
                schema,
                samples_dir,
                rows,
                config["seed"],
                config["train"]["read_tasks_per_stream"],
                config["train"]["tem_holdout"],
            ),
            run_config=ray.train.RunConfig(
                name=stage.name,
                storage_path=storage,
                failure_config=ray.train.FailureConfig(max_failures=config["ray"]["max_failures"]),
                checkpoint_config=ray.train.CheckpointConfig(
                    # The best checkpoint is kept, and Train always keeps the latest as well.
                    num_to_keep=1,
                    checkpoint_score_attribute=SCORE,
                    checkpoint_score_order="max",
                ),
                callbacks=[TuneReportCallback()],
                # Train's own steps (worker group started, each report, each checkpoint) go
                # to its log files under Ray's session logs, not to the console.
                logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            ),
        )
        trainer.fit()
        raise_stage_error(errors)

    if _in_tune_session():
        # Already a trial of a sweep (train/tune.py): fit here, so that TuneReportCallback hands
        # every epoch to that trial and its scheduler; a Tuner of our own would keep them.
        fit({})
    else:
        tuner = tune.Tuner(
            tune.with_resources(fit, TRIAL_RESOURCES),
            param_space=flatten(config),
            run_config=tune.RunConfig(
                name=stage.name,
                storage_path=str(run_dir / TENSORBOARD_DIR),
                callbacks=[TBXLoggerCallback()],
                verbose=0,
            ),
        )
        grid = tuner.fit()
        raise_stage_error(errors)  # the worker's own error, not Tune's wrapping of it
        if grid.errors:
            raise RuntimeError(f"stage {stage.name!r} failed: {grid.errors[0]}")
    result = Result.from_path(str(run_dir / CHECKPOINTS_DIR / stage.name))
    if result.checkpoint is None:
        raise RuntimeError(f"stage {stage.name!r} reported no checkpoint")
    state = TrainState.load(Path(result.checkpoint.path))
    return _stage_result(stage, config, result, state)


def _stage_result(
    stage: Stage, config: dict[str, Any], result: Result, state: TrainState
) -> StageResult:
    best = max(result.best_checkpoints, key=lambda pair: pair[1][SCORE])
    link = ModelLink(stage.model, config["params"].get(stage.name, {}), best[0].path)
    return StageResult(stage.name, link, state, dict(best[1]))
