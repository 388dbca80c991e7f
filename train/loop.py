"""The training loop of one pipeline stage, run by every Ray Train worker.

Each worker iterates its own shard of every entity's train stream (Ray Data `streaming_split`,
equal rows per worker, so every rank takes the same number of DDP steps), mixed into batches by
`train.data.mixed_batches`, and its shard of the `valid` stream.
After each epoch the workers gather their validation scores, all compute the same metric, and
so all take the same early-stopping decision; the first worker writes the epoch's checkpoint.
A restarted worker group (FailureConfig) resumes from the latest checkpoint.

Failures that a restart would only repeat - a non-finite loss, a damaged checkpoint, a drill
that cannot fire - end the run without FailureConfig's retries: each worker writes the error to
`config["error_file"]` and returns, and the driver raises it (`train.stage.raise_stage_error`).
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from mkt.contract import ConfigError
from mkt.metrics import auc, gauc, log_loss
from mkt.models import CTRModel
from mkt.models.base import choose_start, start_note
from mkt.schema import FeatureSchema
from train.checkpoints import (
    CheckpointError,
    ModelLink,
    TrainState,
    build_chain,
    load_optimizer,
    load_weights,
    save_checkpoint,
)
from train.data import ModelBatches, entity_batch_sizes, mixed_batches, train_dataset_name
from train.errors import NonFiniteLossError
from train.faults import check_kill_fired, kill_drill, poisons_step
from train.optim import (
    BestEpoch,
    Optimizer,
    build_optimizer,
    embedding_l2_weight,
    sparse_tables,
    use_sparse_embeddings,
)
from train.sparse_sync import SparseGradients, leave_out_of_ddp

# Train's worker logging sends this to the driver's console once (a print would be echoed twice).
log = logging.getLogger(__name__)

# The metric every checkpoint is ranked by (`CheckpointConfig`); NaN (one class only) ranks last.
SCORE = "score"


# Errors a restart would only repeat, by the name the error file gives their kind.
STAGE_ERRORS: dict[str, type[Exception]] = {
    "nonfinite_loss": NonFiniteLossError,
    "checkpoint": CheckpointError,
    "config": ConfigError,
}


def stage_worker(config: dict[str, Any]) -> None:
    """`train_loop_per_worker` of the stage's TorchTrainer; `config` is built by
    `train.stage.worker_config`."""
    try:
        _train_stage(config)
    except tuple(STAGE_ERRORS.values()) as e:
        # A restart from the same checkpoint would fail the same way, so this ends the run
        # instead of spending FailureConfig's retries: Train sees the workers return, and the
        # driver raises the error it finds in the file.
        kind = next(k for k, cls in STAGE_ERRORS.items() if isinstance(e, cls))
        path = Path(config["error_file"])
        partial = path.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(json.dumps({"kind": kind, "message": str(e)}))
        partial.replace(path)  # atomic: the driver never reads half a file
        log.error("[%s] %s", config["stage"], e)


def _train_stage(config: dict[str, Any]) -> None:
    torch.set_num_threads(config["torch_threads"])
    torch.manual_seed(config["seed"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    schema = FeatureSchema.from_dict(config["schema"])
    opts = config["train"]

    model = build_chain(schema, [ModelLink.from_dict(link) for link in config["chain"]])
    if config["item_attributes"] is not None:
        with np.load(config["item_attributes"]) as maps:
            model.use_item_attributes({n: torch.from_numpy(maps[n]) for n in maps.files})
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_weights(model, directory)
            state = TrainState.load(Path(directory))
        state.resumed_after.append(state.epochs_done)
        if rank == 0:
            log.info("[%s] resuming after epoch %d", config["stage"], state.epochs_done)
    if opts["sparse_embeddings"]:
        use_sparse_embeddings(model, ray.train.torch.get_device(), world, opts["sparse_min_rows"])
    # DDP reduces the dense gradients; the tables on sparse ones are reduced by
    # SparseGradients (train/sparse_sync.py says why not by DDP).
    tables = sparse_tables(model) if world > 1 else []
    leave_out_of_ddp(model, tables)
    wrapped = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": opts["find_unused_parameters"]}
    )
    sparse_gradients = SparseGradients(tables, world)
    sparse_gradients.broadcast()
    # Built after prepare_model: the optimizer state follows the parameters' device.
    optimizer = build_optimizer(model, opts)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            load_optimizer(optimizer, Path(directory))

    device = ray.train.torch.get_device()
    batch_sizes = entity_batch_sizes(config["train_rows"], opts["batch_size"])
    train_shards = {e: ray.train.get_dataset_shard(train_dataset_name(e)) for e in batch_sizes}
    valid_shard = ray.train.get_dataset_shard("valid")
    collate = ModelBatches(schema)
    collate_valid = ModelBatches(schema, keep=[schema.columns["user_key"]])

    def train_batches(epoch: int) -> Any:
        return mixed_batches(
            shard.iter_torch_batches(
                batch_size=batch_sizes[entity],
                collate_fn=collate,
                device=device,
                local_shuffle_buffer_size=opts["shuffle_buffer_rows"] or None,
                local_shuffle_seed=config["seed"] + 1000 * epoch + rank,
            )
            for entity, shard in train_shards.items()
        )

    # A TEM on the MEM's frozen tables has none to regularise: no pass over the data for it.
    if opts["embedding_l2"] > 0 and model.embedding_tables():
        _count_embedding_rows(model, train_batches(0), config["stage"], rank, world)

    def validate() -> tuple[dict[str, float], float]:
        labels, probs, users = _predict(
            model,
            valid_shard.iter_torch_batches(
                batch_size=opts["eval_batch_size"], collate_fn=collate_valid, device=device
            ),
            schema.columns["user_key"],
        )
        valid = _valid_metrics(labels, probs, users, world)
        metric = valid[f"valid_{opts['early_stopping']['metric']}"]
        return valid, (metric if math.isfinite(metric) else -1.0)

    # With plateau_lr_factor < 1 every checkpoint holds the best weights so far (an epoch
    # without improvement goes back to them before its checkpoint), so a resumed group's best
    # is the checkpoint it resumed from.
    lr_factor = opts["early_stopping"]["plateau_lr_factor"]
    kept = BestEpoch()
    if checkpoint is not None and lr_factor < 1:
        kept.keep(model, optimizer)

    if config["score_start"] and checkpoint is None:
        # A stage built on trained ones (a TEM on its MEM, a fine-tuning on its pre-training)
        # is a candidate before its first step: early stopping keeps it when no epoch beats
        # it, so the stage never ends below where it started on validation. Where the model
        # can start in several ways (MKT's TEM: from its MEM, TEM alone or their mean), the
        # best on validation is the start. Reported (for the checkpoint) but not an epoch of
        # the history.
        state.start, starts = choose_start(model, validate, lambda scored: scored[1])
        valid, state.best_score = starts[state.start]
        state.best_valid = valid
        if rank == 0:
            log.info(
                "[%s] before epoch 1: valid auc %.4f gauc %.4f%s",
                config["stage"],
                valid["valid_auc"],
                valid["valid_gauc"],
                start_note(state.start, {k: v["valid_auc"] for k, (v, _) in starts.items()}),
            )
        if lr_factor < 1:
            kept.keep(model, optimizer)
        _report({"epoch": 0, **valid, SCORE: state.best_score}, model, optimizer, state, rank)

    board = _tensorboard(config["tensorboard_dir"], rank)
    while state.epochs_done < opts["epochs"] and not state.stopped_early:
        epoch = state.epochs_done + 1
        model.train()
        batches = train_batches(epoch)
        train_stats = _train_epoch(
            model,
            wrapped,
            optimizer,
            sparse_gradients,
            batches,
            config,
            epoch,
            state.global_step,
            rank,
            world,
        )
        state.global_step += int(train_stats.pop("steps"))
        _check_finite_weights(model, config["stage"], epoch, state.global_step)
        valid, score = validate()
        state.epochs_done = epoch
        metrics = {"epoch": epoch, **train_stats, **valid, SCORE: score}
        reported = metrics
        if score > state.best_score:
            state.best_score, state.best_epoch, state.best_valid = score, epoch, valid
            state.epochs_without_improvement = 0
            if lr_factor < 1:
                kept.keep(model, optimizer)
        else:
            state.epochs_without_improvement += 1
            if lr_factor < 1:
                kept.restore(model, optimizer, lr_factor)
                metrics["restored_epoch"] = state.best_epoch
                # The checkpoint holds the best epoch's weights: it is reported (and ranked,
                # by the stage and by a sweep) with their validation numbers; the history
                # keeps this epoch's own.
                reported = {**metrics, **state.best_valid, SCORE: state.best_score}
        state.stopped_early = (
            state.epochs_without_improvement >= opts["early_stopping"]["patience"]
            and epoch < opts["epochs"]
        )
        state.history.append(metrics)
        if rank == 0:
            log.info(_epoch_line(config["stage"], opts["epochs"], metrics, state))
        if board is not None:
            for name, value in metrics.items():
                board.add_scalar(name, value, epoch)
            board.flush()
        _report(reported, model, optimizer, state, rank)
    if board is not None:
        board.close()


def _tensorboard(directory: str | None, rank: int) -> Any:
    """The first worker's TensorBoard writer; None on the others and inside a sweep's trial
    (Tune records those). A resumed attempt writes a file of its own beside the earlier
    attempt's, and TensorBoard merges them by epoch."""
    if rank != 0 or directory is None:
        return None
    from tensorboardX import SummaryWriter

    return SummaryWriter(directory)


def _count_embedding_rows(model: CTRModel, batches: Any, stage: str, rank: int, world: int) -> None:
    """The counting pass of the embedding L2 (mkt EmbeddingBank.l2_penalty): how many of an
    epoch's batches, over all workers, touch each embedding row. One pass over the train
    stream before the first epoch (and again after a restart: counts are data, not state)."""
    started = time.perf_counter()
    counts = model.count_embedding_rows(batches)
    if world > 1:
        for tensor in counts:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    if rank == 0:
        log.info(
            "[%s] embedding rows counted for the L2 in %.0f s (%d tables)",
            stage,
            time.perf_counter() - started,
            len(counts),
        )


def _train_epoch(
    model: CTRModel,
    wrapped: torch.nn.Module,
    optimizer: Optimizer,
    sparse_gradients: SparseGradients,
    batches: Any,
    config: dict[str, Any],
    epoch: int,
    steps_before: int,
    rank: int,
    world: int,
) -> dict[str, float]:
    """One pass over this worker's shard; returns loss components and throughput, summed
    over all workers, and the number of steps taken. A step reduces the tables' sparse
    gradients (DDP reduced the dense ones during backward), then steps the optimizer."""
    every = config["train"]["progress_every_batches"]
    fault = config["fault"]
    sums: dict[str, float] = {}
    rows = step = 0
    if world > 1:
        # Workers leave the previous epoch's report at different times (the first one writes
        # the checkpoint); without this, another worker's clock would count that write, which
        # at Tenrec-size tables was a third of a short epoch (docs/BENCHMARKS.md).
        dist.barrier()
    started = time.perf_counter()
    for step, batch in enumerate(batches, start=1):
        out = wrapped(batch)
        losses = model.loss(batch, out)
        if config["train"]["embedding_l2"] > 0:
            # Scaled so that over an epoch the objective is the sum of the rows' log losses
            # plus embedding_l2 x the squared norm of every embedding row.
            penalty = model.embedding_l2(batch) / batch["label"].shape[0]
            losses["embedding_l2"] = penalty.detach()
            weight = embedding_l2_weight(config["train"], steps_before + step)
            losses["loss"] = losses["loss"] + weight * penalty
        if poisons_step(fault, steps_before + step, rank, world):
            losses["loss"] = losses["loss"] * float("nan")
        # Before backward: the parameters and the optimizer never see the bad step.
        _check_finite(losses["loss"], config["stage"], epoch, steps_before, step, rank, world)
        optimizer.zero_grad(set_to_none=True)
        losses["loss"].backward()
        sparse_gradients.all_reduce()
        optimizer.step()
        n = int(batch["label"].shape[0])
        rows += n
        for name, value in losses.items():
            sums[name] = sums.get(name, 0.0) + float(value.detach()) * n
        if rank == 0 and step % every == 0:
            elapsed = time.perf_counter() - started
            log.info(
                "[%s] epoch %d step %d: ~%d rows, ~%.0f rows/s, loss %.4f",
                config["stage"],
                epoch,
                step,
                rows * world,
                rows * world / elapsed,
                sums["loss"] / rows,
            )
        kill_drill(fault, epoch, step, rank, world)
    check_kill_fired(fault, epoch, step)
    elapsed = time.perf_counter() - started
    names = sorted(sums)
    # On the worker's device: an NCCL process group has no CPU collectives.
    device = ray.train.torch.get_device()
    totals = torch.tensor(
        [float(rows), *(sums[k] for k in names)], dtype=torch.float64, device=device
    )
    seconds = torch.tensor([elapsed], dtype=torch.float64, device=device)
    if world > 1:
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)
    all_rows = max(totals[0].item(), 1.0)
    stats = {f"train_{k}": totals[i + 1].item() / all_rows for i, k in enumerate(names)}
    stats.update(
        train_rows=totals[0].item(),
        train_seconds=seconds.item(),
        rows_per_s=totals[0].item() / max(seconds.item(), 1e-9),
        steps=float(step),
    )
    return stats


def _check_finite(
    loss: torch.Tensor, stage: str, epoch: int, steps_before: int, step: int, rank: int, world: int
) -> None:
    """Raise NonFiniteLossError on every rank when any rank's loss is NaN or infinite. The sum
    over the ranks is non-finite exactly then (float64: finite losses cannot overflow it), so
    all ranks stop at the same step, and none waits in a collective for one that stopped."""
    local = loss.detach().double().reshape(1)
    total = local.clone()
    if world > 1:
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    if math.isfinite(total.item()):
        return
    values = [local.clone() for _ in range(world)]
    if world > 1:
        dist.all_gather(values, local)
    bad = {r: v.item() for r, v in enumerate(values) if not math.isfinite(v.item())}
    last = f"epoch {epoch - 1}'s" if epoch > 1 else "none"
    raise NonFiniteLossError(
        f"stage {stage!r}: non-finite loss at epoch {epoch}, global step {steps_before + step} "
        f"(batch {step} of the epoch), on worker rank(s) {sorted(bad)} (loss {bad}); the run "
        f"stops without writing epoch {epoch}'s checkpoint (latest kept: {last}); a restart "
        "would repeat it, so no retry is made: lower train.lr or check the inputs"
    )


@torch.no_grad()
def _predict(
    model: CTRModel, batches: Any, user_key: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    model.eval()
    labels, probs, users = [], [], []
    for batch in batches:
        probs.append(torch.sigmoid(model(batch)["logit"]).double().cpu().numpy())
        labels.append(batch["label"].cpu().numpy().astype(np.int64))
        users.append(batch[user_key].cpu().numpy())
    if not labels:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
    return np.concatenate(labels), np.concatenate(probs), np.concatenate(users)


def _valid_metrics(
    labels: np.ndarray, probs: np.ndarray, users: np.ndarray, world: int
) -> dict[str, float]:
    """Gather every worker's validation scores (3 numbers a row), then the metrics."""
    if world > 1:
        parts: list[Any] = [None] * world
        dist.all_gather_object(parts, (labels, probs, users))
        labels, probs, users = (np.concatenate([p[i] for p in parts]) for i in range(3))
    if len(labels) == 0:
        raise RuntimeError("the validation slice is empty; check the samples' valid split")
    g, coverage = gauc(labels, probs, users)
    return {
        "valid_auc": auc(labels, probs),
        "valid_gauc": g,
        "valid_gauc_coverage": coverage,
        "valid_logloss": log_loss(labels, probs),
        "valid_rows": float(len(labels)),
    }


def _report(
    metrics: dict[str, float],
    model: CTRModel,
    optimizer: Optimizer,
    state: TrainState,
    rank: int,
) -> None:
    """Every worker reports; only the first writes the checkpoint (the model is replicated)."""
    with tempfile.TemporaryDirectory() as directory:
        checkpoint = None
        if rank == 0:
            save_checkpoint(Path(directory), model, optimizer, state)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(metrics, checkpoint=checkpoint)


def _check_finite_weights(model: CTRModel, stage: str, epoch: int, global_step: int) -> None:
    """A finite loss can still give an infinite gradient, whose update leaves non-finite
    weights; the next step's loss would catch it, but not after an epoch's last step. Checked
    before the epoch's checkpoint, so that none holds such weights. Every rank holds the same
    weights (DDP), so all stop alike."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteLossError(
            f"stage {stage!r}: non-finite weights after epoch {epoch} (global step "
            f"{global_step}), e.g. {bad[:3]}; epoch {epoch}'s checkpoint is not written"
        )


def _epoch_line(stage: str, epochs: int, m: dict[str, float], state: TrainState) -> str:
    stop = " (early stop)" if state.stopped_early else ""
    if "restored_epoch" in m and not state.stopped_early:
        stop += f", back to epoch {int(m['restored_epoch'])} at a smaller step"
    return (
        f"[{stage}] epoch {int(m['epoch'])}/{epochs}: {int(m['train_rows'])} rows, "
        f"{m['rows_per_s']:,.0f} rows/s, loss {m['train_loss']:.4f}, "
        f"valid auc {m['valid_auc']:.4f} gauc {m['valid_gauc']:.4f}, "
        f"best epoch {state.best_epoch}{stop}"
    )
