"""Names of models and training pipelines. Model files register into this module; it imports
no model, so no module registers into one that imports it back.

A pipeline says which models are trained, in which order, on which entity's rows. MKT is
MEM on mixed source + target rows, then TEM on target rows with the MEM plugged in and frozen
(section 3), with the target's own model trained in between (docs/model.md, TEM choice 5).
A model alone is a one-stage pipeline.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

if TYPE_CHECKING:
    from mkt.models.base import CTRModel

TARGET_ROWS = ("all", "pretrain", "holdout")


@dataclass(frozen=True)
class Stage:
    name: str  # stage name, also the key of its params in the run config
    model: str  # registry name of the model
    entities: str  # rows the stage trains on: "target", "source" or "both"
    # The earlier stage whose trained model is passed as `pretrained`, or several (a tuple,
    # passed in this order): MKT's TEM takes its MEM and the target's own model.
    pretrained_from: str | tuple[str, ...] | None = None
    # Which of the target entity's train rows: "all"; "pretrain", all but the share the run
    # config holds out for the second stage (`train.tem_holdout`); "holdout", that share only.
    # MKT's TEM learns how far to trust the frozen MEM's knowledge on rows the MEM never
    # fitted, as it will meet test rows (docs/model.md, TEM choice 2).
    target_rows: str = "all"

    def __post_init__(self) -> None:
        if self.target_rows not in TARGET_ROWS:
            raise ValueError(f"stage {self.name!r}: target_rows must be one of {TARGET_ROWS}")

    @property
    def built_on(self) -> tuple[str, ...]:
        """The earlier stages this one's model is built on, in the order it takes them."""
        if self.pretrained_from is None:
            return ()
        if isinstance(self.pretrained_from, str):
            return (self.pretrained_from,)
        return self.pretrained_from


MODELS: dict[str, type[CTRModel]] = {}
PIPELINES: dict[str, tuple[Stage, ...]] = {}

M = TypeVar("M", bound="type[CTRModel]")


def register(name: str) -> Callable[[M], M]:
    """Class decorator: `@register("din")` makes the model buildable by that name."""

    def deco(cls: M) -> M:
        if name in MODELS:
            raise ValueError(f"model name {name!r} registered twice")
        MODELS[name] = cls
        return cls

    return deco


def register_pipeline(name: str, stages: tuple[Stage, ...]) -> None:
    if name in PIPELINES:
        raise ValueError(f"pipeline {name!r} registered twice")
    PIPELINES[name] = stages
