"""What every model in the zoo is: a `CTRModel` built from a feature schema and params.

A model maps a batch (see `mkt.features`) to one logit per row. Joint models route each row
by `batch["entity_index"]` to its entity's tower; single-entity models only ever see the rows
of the entity they are trained on (`train_entities`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from mkt.features import Batch
from mkt.schema import FeatureSchema


class ConfigError(ValueError):
    """Bad model parameters; the message names the key."""


class CTRModel(nn.Module):
    # Which rows a stage of this model trains on: "target", "source" or "both".
    train_entities: ClassVar[str] = "target"
    # Defaults of every accepted parameter; `build_model` rejects any other key.
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, schema: FeatureSchema, params: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.schema = schema
        self.params = resolve_params(type(self), params or {})

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Returns at least `logit`: `[B]`. Models may add tensors (e.g. for aux losses)."""
        raise NotImplementedError

    def loss(self, batch: Batch, out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """`loss` (what is minimised) plus named components for logging."""
        bce = F.binary_cross_entropy_with_logits(out["logit"], batch["label"])
        return {"loss": bce, "bce": bce.detach()}


def resolve_params(cls: type[CTRModel], params: Mapping[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(params) - set(cls.defaults))
    if unknown:
        raise ConfigError(
            f"{cls.__name__}: unknown parameter(s) {unknown}; accepted: {sorted(cls.defaults)}"
        )
    resolved = dict(cls.defaults)
    for key, value in params.items():
        default = cls.defaults[key]
        if default is not None and value is not None and not _compatible(default, value):
            raise ConfigError(
                f"{cls.__name__}.{key}: expected {type(default).__name__}, got {value!r}"
            )
        resolved[key] = value
    return resolved


def _compatible(default: Any, value: Any) -> bool:
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, list | tuple):
        return isinstance(value, list | tuple)
    return isinstance(value, type(default))
