"""What a stage checkpoint holds, and how a pipeline's models are rebuilt from checkpoints.

A checkpoint directory (one per epoch, written through `ray.train.report`):
- `model.safetensors`: the stage model's weights (safetensors: loading runs no code);
- `optimizer.pt`: the optimizer state, read back with `torch.load(weights_only=True)`;
- `train_state.json`: epoch, global step, early-stopping state and the per-epoch history;
- `manifest.json`, written last: the size and sha256 of each file above. Every load checks the
  file it reads against it first and raises `CheckpointError`, naming the file, when the
  manifest or the file is missing, or the file is truncated or changed; a damaged checkpoint is
  never loaded. A checkpoint written before manifests existed is refused the same way.

A model of a later stage is built on the model(s) of the stage(s) it continues from
(`pretrained`, e.g. TEM on MEM and TEM alone), so rebuilding it means rebuilding that chain,
oldest first.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors.torch
import torch

from mkt.models import CTRModel, build_model
from mkt.schema import FeatureSchema

if TYPE_CHECKING:
    from train.optim import Optimizer

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"
MANIFEST_FILE = "manifest.json"
CHECKPOINT_FILES = (MODEL_FILE, OPTIMIZER_FILE, STATE_FILE)


class CheckpointError(ValueError):
    """A checkpoint file that must not be loaded; the message names the file."""


@dataclass
class TrainState:
    """Where a stage's training stands after its last finished epoch."""

    epochs_done: int = 0
    # Optimizer steps over all epochs done (per worker: every rank takes the same steps).
    global_step: int = 0
    best_score: float = float("-inf")
    best_epoch: int = 0
    # The best epoch's validation metrics: what a checkpoint that went back to it reports.
    best_valid: dict[str, float] = field(default_factory=dict)
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    # Epochs from which a restarted worker group resumed (fault tolerance at work).
    resumed_after: list[int] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)
    # The start chosen on validation where the model has several (`CTRModel.start_options`).
    start: str | None = None

    def save(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: str | Path) -> TrainState:
        path = verified(directory, STATE_FILE)
        return cls(**json.loads(path.read_text()))


def save_checkpoint(
    directory: Path, model: CTRModel, optimizer: Optimizer, state: TrainState
) -> None:
    # save_model (not save_file) copes with parameters shared between submodules.
    safetensors.torch.save_model(model, str(directory / MODEL_FILE))
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    state.save(directory)
    # Last: a save cut short leaves no manifest, and so a checkpoint no load accepts.
    files = {}
    for name in CHECKPOINT_FILES:
        size, digest = _digest(directory / name)
        files[name] = {"bytes": size, "sha256": digest}
    (directory / MANIFEST_FILE).write_text(json.dumps({"files": files}, indent=1))


def _digest(path: Path) -> tuple[int, str]:
    sha, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            sha.update(chunk)
            size += len(chunk)
    return size, sha.hexdigest()


def verified(directory: str | Path, name: str) -> Path:
    """The path of checkpoint file `name`, once it matches the checkpoint's manifest."""
    directory = Path(directory)
    manifest_path, path = directory / MANIFEST_FILE, directory / name
    if not manifest_path.is_file():
        raise CheckpointError(
            f"{manifest_path}: no manifest, so {path} cannot be verified (the checkpoint was "
            "not completely written, or predates manifests); it is not loaded"
        )
    try:
        entry = json.loads(manifest_path.read_text())["files"][name]
        expected_size, expected_sha = int(entry["bytes"]), str(entry["sha256"])
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(
            f"{manifest_path}: unreadable or has no entry for {name} ({e!r})"
        ) from e
    if not path.is_file():
        raise CheckpointError(f"{path}: missing, though {manifest_path} lists it")
    size, sha = _digest(path)
    if size != expected_size:
        raise CheckpointError(
            f"{path}: {size} bytes, the manifest says {expected_size} (truncated or overwritten)"
        )
    if sha != expected_sha:
        raise CheckpointError(f"{path}: sha256 differs from the manifest's (corrupt or changed)")
    return path


def verify_checkpoint(directory: str | Path) -> None:
    """Every file of the checkpoint against its manifest (CheckpointError naming the first
    that differs)."""
    for name in CHECKPOINT_FILES:
        verified(directory, name)


def load_weights(model: CTRModel, directory: str | Path) -> None:
    path = verified(directory, MODEL_FILE)
    missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit {type(model).__name__} "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )


def load_optimizer(optimizer: Optimizer, directory: str | Path) -> None:
    path = verified(directory, OPTIMIZER_FILE)
    optimizer.load_state_dict(torch.load(path, weights_only=True))


@dataclass(frozen=True)
class ModelLink:
    """One model of a pipeline chain; `weights` is its checkpoint directory, or None for a
    model about to be trained. `built_on`: the chain positions of the models it is built on
    (`pretrained`, in that order); None is the link before it (a chain in a line)."""

    model: str
    params: Mapping[str, Any]
    weights: str | None = None
    built_on: tuple[int, ...] | None = None

    def to_dict(self) -> dict[str, Any]:
        raw = {"model": self.model, "params": dict(self.params), "weights": self.weights}
        return raw if self.built_on is None else {**raw, "built_on": list(self.built_on)}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelLink:
        built_on = raw.get("built_on")
        return cls(
            raw["model"],
            dict(raw["params"]),
            raw["weights"],
            None if built_on is None else tuple(built_on),
        )


def chain_on(bases: Sequence[Sequence[ModelLink]], link: ModelLink) -> list[ModelLink]:
    """The chain of a model built on the models that end each of `bases` (the chains of the
    stages it continues from, in the order it takes them)."""
    if len(bases) <= 1:
        return [*(bases[0] if bases else []), link]
    links: list[ModelLink] = []
    ends = []
    for base in bases:
        offset = len(links)
        for i, earlier in enumerate(base):
            inputs = earlier.built_on
            if inputs is None:
                inputs = (i - 1,) if i else ()
            links.append(replace(earlier, built_on=tuple(offset + j for j in inputs)))
        ends.append(len(links) - 1)
    return [*links, replace(link, built_on=tuple(ends))]


def build_chain(schema: FeatureSchema, links: Sequence[ModelLink]) -> CTRModel:
    """Build each model on the ones it is built on (`pretrained`), loading weights where
    given."""
    if not links:
        raise ValueError("an empty model chain")
    models: list[CTRModel] = []
    for link in links:
        built_on = link.built_on
        if built_on is None:  # a chain in a line: the link before
            built_on = (len(models) - 1,) if models else ()
        pretrained = tuple(models[i] for i in built_on)
        model = build_model(link.model, schema, link.params, pretrained=pretrained)
        if link.weights is not None:
            load_weights(model, link.weights)
        models.append(model)
    return models[-1]
