"""The model zoo: every model is one file registering itself under a name (mkt.registry).

`build_model("mem", schema, params)` builds one; `MODELS` lists them. A new baseline is one
new file with `@register("name")` plus its name in the import list below.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from mkt.contract import ConfigError
from mkt.models import (  # noqa: F401  (each file registers its model; keep sorted)
    conet,
    ctnet,
    din,
    din_source,
    fibinet,
    finetune,
    lr,
    mem,
    minet,
    mlp,
    mmoe,
    ple,
    star,
    tem,
)
from mkt.models.base import CTRModel
from mkt.registry import MODELS
from mkt.schema import FeatureSchema


def build_model(
    name: str,
    schema: FeatureSchema,
    params: Mapping[str, Any] | None = None,
    pretrained: CTRModel | tuple[CTRModel, ...] | None = None,
) -> CTRModel:
    """Build a registered model. `pretrained` is the earlier stage's model (MEM for TEM, the
    source model for Finetune / CTNet), or the earlier stages' models in the order the stage
    names them (MKT's TEM: its MEM and the target's own model); a tuple of one is that model."""
    if name not in MODELS:
        raise ConfigError(f"model: unknown model {name!r}; known: {sorted(MODELS)}")
    cls = MODELS[name]
    if isinstance(pretrained, tuple) and len(pretrained) <= 1:
        pretrained = pretrained[0] if pretrained else None
    if pretrained is not None:
        return cls(schema, params, pretrained=pretrained)  # type: ignore[call-arg]
    return cls(schema, params)


__all__ = ["MODELS", "CTRModel", "ConfigError", "build_model"]
