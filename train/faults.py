"""Fault drills: failures the tests inject into a real run, so that the recovery paths run as
they would after a real failure (docs/RELIABILITY.md). They are not part of a user's config
(conf/run/default.yaml does not list them): their defaults live here, all off, and a test turns
one on with an override such as `fault.kill_worker_at.epoch=2`.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mkt.contract import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KillWorkerAt:
    epoch: int | None
    batch: int | None


@dataclass(frozen=True)
class RunFaults:
    """The `fault` section of a run config (train/config.py's RunConfig)."""

    kill_worker_at: KillWorkerAt
    nonfinite_loss_at_step: int | None


@dataclass(frozen=True)
class SweepFaults:
    interrupt_after_trials: int | None


# The `fault` section's defaults, all off.
RUN_FAULTS: dict[str, Any] = {
    # SIGKILL of the last worker's process, once, right after this batch (1-based) of this
    # epoch (1-based); the stage must resume from the previous epoch's checkpoint. Both or
    # neither.
    "kill_worker_at": {"epoch": None, "batch": None},
    # The last worker's loss becomes NaN at this global step (1-based, counted over all
    # epochs); the run must stop with an error naming it, without writing that epoch's
    # checkpoint.
    "nonfinite_loss_at_step": None,
}
# The `fault` section of a sweep config: the sweep interrupts itself (as Ctrl-C does) once
# this many trials have finished; rerunning the same command must resume it.
SWEEP_FAULTS: dict[str, Any] = {"interrupt_after_trials": None}


def check_fault(config: Mapping[str, Any]) -> None:
    """The drills' keys; a drill that could never fire is an error, not a silent no-op."""
    fault = config["fault"]
    kill = fault["kill_worker_at"]
    for name in ("epoch", "batch"):
        value = kill[name]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise ConfigError(f"fault.kill_worker_at.{name}: null or an integer, got {value!r}")
        if value is not None and value < 1:
            raise ConfigError(f"fault.kill_worker_at.{name}: must be >= 1 (1-based), got {value}")
    if (kill["epoch"] is None) != (kill["batch"] is None):
        unset = "epoch" if kill["epoch"] is None else "batch"
        raise ConfigError(
            f"fault.kill_worker_at.{unset}: must be set together with the other key of "
            "fault.kill_worker_at (or both null)"
        )
    if kill["epoch"] is not None and kill["epoch"] > config["train"]["epochs"]:
        raise ConfigError(
            f"fault.kill_worker_at.epoch: {kill['epoch']} is after the last epoch "
            f"(train.epochs={config['train']['epochs']}); the drill would never fire"
        )
    step = fault["nonfinite_loss_at_step"]
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 1):
        raise ConfigError(f"fault.nonfinite_loss_at_step: null or a step number >= 1, got {step!r}")


def poisons_step(fault: Mapping[str, Any], global_step: int, rank: int, world: int) -> bool:
    """Whether this worker's loss is to become NaN at this step (the non-finite drill)."""
    return fault["nonfinite_loss_at_step"] == global_step and rank == world - 1


def check_kill_fired(fault: Mapping[str, Any], epoch: int, steps: int) -> None:
    """After an epoch of `steps` batches: a kill drill set for a later batch of this epoch
    could never fire, which is an error, not a silent no-op."""
    kill = fault["kill_worker_at"]
    if kill["epoch"] == epoch and steps < kill["batch"] and not Path(fault["marker"]).exists():
        raise ConfigError(
            f"fault.kill_worker_at.batch: {kill['batch']}, but epoch {epoch} has only {steps} "
            "batches per worker; the drill would never fire"
        )


def kill_drill(fault: dict[str, Any], epoch: int, step: int, rank: int, world: int) -> None:
    """SIGKILL the last worker's own process once, right after step `batch` of epoch `epoch`
    (tests). SIGKILL, not an exception: nothing in the process runs after it (no `finally`,
    no Ray or gloo shutdown), as when the OOM killer or a lost node takes a worker. It first
    waits until Train has registered the previous epoch's checkpoint, so the restart must
    resume after exactly that epoch: a deterministic drill, not a race with the controller."""
    kill = fault["kill_worker_at"]
    if (kill["epoch"], kill["batch"]) != (epoch, step) or rank != world - 1:
        return
    marker = Path(fault["marker"])
    if marker.exists():
        return
    deadline = time.monotonic() + 120
    while _registered_epochs(fault["storage"]) < epoch - 1:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fault drill: epoch {epoch - 1}'s checkpoint never registered")
        time.sleep(0.5)
    marker.write_text(f"worker {rank} killed in epoch {epoch} after batch {step}\n")
    log.warning(
        "fault drill: SIGKILL of worker %d (pid %d) in epoch %d after batch %d",
        rank,
        os.getpid(),
        epoch,
        step,
    )
    os.kill(os.getpid(), signal.SIGKILL)


def _registered_epochs(storage: str) -> int:
    """Epochs done in the latest checkpoint Train has registered for this stage."""
    import ray.train

    from train.checkpoints import TrainState

    try:
        latest = ray.train.Result.from_path(storage).checkpoint
        return TrainState.load(Path(latest.path)).epochs_done if latest else 0
    except (RuntimeError, OSError, ValueError):  # snapshot not written yet, or mid-write
        return 0
