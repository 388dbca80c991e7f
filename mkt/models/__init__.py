"""The model zoo: every model is one file registering itself under a name.

`build_model("mem", schema, params)` builds one; `MODELS` lists them. A new baseline is one
new file with `@register("name")` plus an import line below.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from mkt.models.base import ConfigError, CTRModel
from mkt.schema import FeatureSchema

MODELS: dict[str, type[CTRModel]] = {}


def register(name: str) -> Callable[[type[CTRModel]], type[CTRModel]]:
    def deco(cls: type[CTRModel]) -> type[CTRModel]:
        if name in MODELS:
            raise ValueError(f"model name {name!r} registered twice")
        MODELS[name] = cls
        return cls

    return deco


def build_model(
    name: str,
    schema: FeatureSchema,
    params: Mapping[str, Any] | None = None,
    pretrained: CTRModel | None = None,
) -> CTRModel:
    """Build a registered model. `pretrained` is the previous stage's model (two-stage
    pipelines: MEM for TEM, the source model for Finetune / CTNet)."""
    if name not in MODELS:
        raise ConfigError(f"model: unknown model {name!r}; known: {sorted(MODELS)}")
    cls = MODELS[name]
    if pretrained is not None:
        return cls(schema, params, pretrained=pretrained)  # type: ignore[call-arg]
    return cls(schema, params)


__all__ = ["MODELS", "CTRModel", "ConfigError", "build_model", "register"]

# Model files register themselves on import (keep this list sorted).
from mkt.models import _zoo  # noqa: E402,F401
