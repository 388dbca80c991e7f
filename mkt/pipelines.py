"""Training recipes: which models are trained, in which order, on which entity's rows.

MKT is two stages (section 3): MEM on mixed source + target rows, then TEM on target rows
with the stage-1 MEM plugged in and frozen. Single-stage models are one-stage pipelines.
The trainer runs a pipeline stage by stage and never needs to know a model's internals.
"""

from __future__ import annotations

from dataclasses import dataclass

TARGET_ROWS = ("all", "pretrain", "holdout")


@dataclass(frozen=True)
class Stage:
    name: str  # stage name, also the key of its params in the run config
    model: str  # registry name in mkt.models
    entities: str  # rows the stage trains on: "target", "source" or "both"
    pretrained_from: str | None = None  # earlier stage whose model is passed as `pretrained`
    # Which of the target entity's train rows: "all"; "pretrain", all but the share the run
    # config holds out for the second stage (`train.tem_holdout`); "holdout", that share only.
    # MKT's TEM learns how far to trust the frozen MEM's knowledge on rows the MEM never
    # fitted, as it will meet test rows (docs/model.md, TEM choice 2).
    target_rows: str = "all"

    def __post_init__(self) -> None:
        if self.target_rows not in TARGET_ROWS:
            raise ValueError(f"stage {self.name!r}: target_rows must be one of {TARGET_ROWS}")


PIPELINES: dict[str, tuple[Stage, ...]] = {
    # The paper's MKT (sections 3.2-3.3).
    "mkt": (
        Stage("mem", "mem", "both", target_rows="pretrain"),
        Stage("tem", "tem", "target", pretrained_from="mem", target_rows="holdout"),
    ),
    # Ablations (Table 4): w/o MEM is TEM alone; w/o TEM is MKT's MEM, its target tower.
    # (w/o PDL and w/o HFA are MKT with mem.gamma=0 / mem.hfa=false.)
    "tem_only": (Stage("tem", "tem", "target"),),
    "mem_only": (Stage("mem", "mem", "both", target_rows="pretrain"),),
}


def register_pipeline(name: str, stages: tuple[Stage, ...]) -> None:
    if name in PIPELINES:
        raise ValueError(f"pipeline {name!r} registered twice")
    PIPELINES[name] = stages


def pipeline(name: str) -> tuple[Stage, ...]:
    """The stages of a named pipeline; any registered model alone is a one-stage pipeline."""
    if name in PIPELINES:
        return PIPELINES[name]
    if name in MODELS:
        return (Stage(name, name, MODELS[name].train_entities),)
    raise ConfigError(
        f"model: {name!r} is neither a pipeline {sorted(PIPELINES)} nor a model {sorted(MODELS)}"
    )


# Imported last: model files register their own pipelines on import (Finetune, CTNet), which
# needs `Stage` and `register_pipeline` above to exist whichever module is imported first.
from mkt.models import MODELS, ConfigError  # noqa: E402
