"""What a stage checkpoint holds, and how a pipeline's models are rebuilt from checkpoints.

A checkpoint directory (one per epoch, written through `ray.train.report`):
- `model.safetensors`: the stage model's weights (safetensors: loading runs no code);
- `optimizer.pt`: the optimizer state, read back with `torch.load(weights_only=True)`;
- `train_state.json`: epoch, early-stopping state and the per-epoch history.

A model of a later stage is built on the model of the stage it continues from (`pretrained`,
e.g. TEM on MEM), so rebuilding it means rebuilding that chain, oldest first.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from mkt.models import CTRModel, build_model
from mkt.schema import FeatureSchema

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
STATE_FILE = "train_state.json"


@dataclass
class TrainState:
    """Where a stage's training stands after its last finished epoch."""

    epochs_done: int = 0
    best_score: float = float("-inf")
    best_epoch: int = 0
    epochs_without_improvement: int = 0
    stopped_early: bool = False
    # Epochs from which a restarted worker group resumed (fault tolerance at work).
    resumed_after: list[int] = field(default_factory=list)
    history: list[dict[str, float]] = field(default_factory=list)

    def save(self, directory: Path) -> None:
        (directory / STATE_FILE).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, directory: Path) -> TrainState:
        return cls(**json.loads((directory / STATE_FILE).read_text()))


def save_checkpoint(
    directory: Path, model: CTRModel, optimizer: torch.optim.Optimizer, state: TrainState
) -> None:
    # save_model (not save_file) copes with parameters shared between submodules.
    safetensors.torch.save_model(model, str(directory / MODEL_FILE))
    torch.save(optimizer.state_dict(), directory / OPTIMIZER_FILE)
    state.save(directory)


def load_weights(model: CTRModel, directory: str | Path) -> None:
    path = Path(directory) / MODEL_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no model weights in this checkpoint")
    missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{path}: weights do not fit {type(model).__name__} "
            f"(missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]})"
        )


def load_optimizer(optimizer: torch.optim.Optimizer, directory: Path) -> None:
    optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, weights_only=True))


@dataclass(frozen=True)
class ModelLink:
    """One model of a pipeline chain; `weights` is its checkpoint directory, or None for a
    model about to be trained."""

    model: str
    params: Mapping[str, Any]
    weights: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"model": self.model, "params": dict(self.params), "weights": self.weights}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> ModelLink:
        return cls(raw["model"], dict(raw["params"]), raw["weights"])


def build_chain(schema: FeatureSchema, links: Sequence[ModelLink]) -> CTRModel:
    """Build each model on the previous one (`pretrained`), loading weights where given."""
    if not links:
        raise ValueError("an empty model chain")
    model: CTRModel | None = None
    for link in links:
        model = build_model(link.model, schema, link.params, pretrained=model)
        if link.weights is not None:
            load_weights(model, link.weights)
    assert model is not None
    return model
