"""Run one pipeline stage: a Ray Train `TorchTrainer` over the streamed samples.

The driver fits the trainer itself. Train V2 has no TensorBoard integration, so the first
worker writes each epoch's metrics to `RUN_DIR/tensorboard/<stage>` (train.loop); inside a
sweep's trial (train/tune.py) Train's `TuneReportCallback` hands the epochs to the trial
instead, whose scheduler and logger callbacks need them. MLflow is logged by train.tracking.
Checkpoints, restarts and early stopping are Train's and the loop's.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import ray
import ray.train
from ray.data import RandomSeedConfig
from ray.train import Result
from ray.train.torch import TorchConfig, TorchTrainer
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.trainable.trainable_fn_utils import _in_tune_session

from mkt.pipelines import Stage
from mkt.schema import FeatureSchema
from train.checkpoints import ModelLink, TrainState, verify_checkpoint
from train.data import (
    entity_rows,
    model_columns,
    read_samples,
    stage_entities,
    stage_target_share,
    target_rows_filter,
    train_dataset_name,
    train_item_attributes,
)
from train.loop import SCORE, STAGE_ERRORS, stage_worker

CHECKPOINTS_DIR = "checkpoints"
# The run's item -> attribute maps (train.item_attributes), read once off the samples.
ITEM_ATTRIBUTES_FILE = "item_attributes.npz"
TENSORBOARD_DIR = "tensorboard"


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
    in_sweep: bool,
    item_attributes: Path | None = None,
) -> dict[str, Any]:
    """Everything `stage_worker` needs, as plain data (it crosses process boundaries)."""
    return {
        "stage": stage.name,
        # The maps the stage's new model reads its items' attributes from (None: off).
        "item_attributes": None if item_attributes is None else str(item_attributes),
        "train_rows": rows,
        "schema": schema.to_dict(),
        "chain": [link.to_dict() for link in chain],
        "train": config["train"],
        "seed": config["seed"],
        # Scored before its first epoch (train.loop): a stage that starts from a trained one.
        "score_start": len(chain) > 1,
        "torch_threads": config["scaling"]["torch_threads"],
        "fault": {
            **config["fault"],
            "marker": str(run_dir / f".fault-drill-{stage.name}"),
            "storage": str(run_dir / CHECKPOINTS_DIR / stage.name),
        },
        "error_file": str(error_file(run_dir, stage)),
        # A sweep's trials are recorded by Tune's logger callbacks (train/sweep.py).
        "tensorboard_dir": None if in_sweep else str(run_dir / TENSORBOARD_DIR / stage.name),
    }


def item_attributes_file(
    samples_dir: Path, schema: FeatureSchema, run_dir: Path, config: dict[str, Any]
) -> Path | None:
    """The run's item attribute maps (`train.data.train_item_attributes`), written once into
    RUN_DIR for every stage's workers; None when `train.item_attributes` is off."""
    if not config["train"]["item_attributes"]:
        return None
    path = run_dir / ITEM_ATTRIBUTES_FILE
    if not path.is_file():
        maps = train_item_attributes(samples_dir, schema)
        partial = path.with_suffix(".tmp.npz")
        np.savez(partial, **{name: m.numpy() for name, m in maps.items()})
        partial.replace(path)  # a crash never leaves half a file for the next invocation
    return path


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
    cache_max_rows: int,
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
    valid_rows = entity_rows(samples_dir, schema, valid_entity, "valid")
    if 0 < sum(rows.values()) + valid_rows <= cache_max_rows:
        # Read once; each epoch replays the blocks in a new order (reproducible from the seed).
        order = RandomSeedConfig(seed=seed, reseed_after_execution=True)
        datasets = {
            name: ds.materialize().randomize_block_order(seed=order)
            for name, ds in datasets.items()
        }
    return datasets


@contextlib.contextmanager
def read_block_size(read_block_bytes: int | None) -> Iterator[None]:
    """Reads created inside take `read_block_bytes` as their largest block (a read copies the
    current DataContext when it is created); the context is restored after."""
    context = ray.data.DataContext.get_current()
    default = context.target_max_block_size
    if read_block_bytes is not None:
        context.target_max_block_size = read_block_bytes
    try:
        yield
    finally:
        context.target_max_block_size = default


def earlier_attempt(stage: Stage, run_dir: Path) -> Result | None:
    """What an earlier invocation with this RUN_DIR left of the stage, if it checkpointed."""
    path = run_dir / CHECKPOINTS_DIR / stage.name
    if not path.is_dir():
        return None
    try:
        result = Result.from_path(str(path))
    except RuntimeError:
        return None
    return result if result.checkpoint is not None else None


def verify_resume_checkpoints(stages: Sequence[Stage], run_dir: Path) -> None:
    """Check the checkpoint each stage would resume from (CheckpointError names a damaged
    file). The workers check it again as they load it; checked first, a damaged one fails in
    seconds, before Ray or a worker group starts for nothing. Needs no running Ray."""
    for stage in stages:
        resumed = earlier_attempt(stage, run_dir)
        if resumed is not None:
            verify_checkpoint(resumed.checkpoint.path)


def finished(stage: Stage, config: dict[str, Any], run_dir: Path) -> StageResult | None:
    """The result of a stage an earlier invocation with this RUN_DIR already completed."""
    result = earlier_attempt(stage, run_dir)
    if result is None:
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
    # A trial of a sweep (train/tune.py): TuneReportCallback hands every epoch to the trial
    # and its scheduler.
    in_sweep = _in_tune_session()
    attributes = item_attributes_file(samples_dir, schema, run_dir, config)
    train_loop_config = worker_config(
        stage, config, schema, chain, run_dir, rows, in_sweep, attributes
    )
    print(
        f"[{stage.name}] start: {stage.model}, {', '.join(f'{n} {e}' for e, n in rows.items())} "
        f"train rows, {scaling['num_workers']} worker(s) x {scaling['cpus_per_worker']} CPU"
        f"{' + 1 GPU' if gpu else ''}, up to {config['train']['epochs']} epochs",
        flush=True,
    )
    verify_resume_checkpoints([stage], run_dir)
    storage = str(run_dir / CHECKPOINTS_DIR)
    errors = error_file(run_dir, stage)
    errors.unlink(missing_ok=True)  # an earlier invocation's; this one starts afresh

    with read_block_size(config["train"]["read_block_bytes"]):
        datasets = stage_datasets(
            stage,
            schema,
            samples_dir,
            rows,
            config["seed"],
            config["train"]["read_tasks_per_stream"],
            config["train"]["tem_holdout"],
            config["train"]["cache_max_rows"],
        )
    trainer = TorchTrainer(
        stage_worker,
        train_loop_config=train_loop_config,
        torch_config=TorchConfig(backend="nccl" if gpu else "gloo"),
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling["num_workers"],
            use_gpu=gpu,
            resources_per_worker=resources,
        ),
        datasets=datasets,
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
            callbacks=[TuneReportCallback()] if in_sweep else [],
            # Train's own steps (worker group started, each report, each checkpoint) go
            # to its log files under Ray's session logs, not to the console.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )
    try:
        trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise RuntimeError(f"stage {stage.name!r} failed: {e}") from e
    raise_stage_error(errors)  # the worker's own error, ending the stage without retries
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
