"""Training recipes: which models are trained, in which order, on which entity's rows.

MKT is MEM on mixed source + target rows, then TEM on target rows with the MEM plugged in and
frozen (section 3); between them, the target's own model (TEM alone) on the MEM's target rows,
which the TEM weighs against the MEM (docs/model.md, TEM choice 5). Single-stage models are
one-stage pipelines.
The trainer runs a pipeline stage by stage and never needs to know a model's internals.
"""

from __future__ import annotations

import mkt.models  # noqa: F401  (registers every model and the baselines' own pipelines)
from mkt.contract import ConfigError
from mkt.registry import MODELS, PIPELINES, Stage, register_pipeline

# MKT (sections 3.2-3.3). The TEM learns, on target rows neither earlier stage fitted, how far
# to trust the MEM against a model of the target's rows alone: where the source carries
# nothing for the target, that is how the TEM shuts the MEM out (docs/model.md, TEM choice 5).
_MEM = Stage("mem", "mem", "both", target_rows="pretrain")
register_pipeline(
    "mkt",
    (
        _MEM,
        Stage("tem_alone", "tem", "target", target_rows="pretrain"),
        Stage("tem", "tem", "target", pretrained_from=("mem", "tem_alone"), target_rows="holdout"),
    ),
)
# The paper's two stages: the TEM on the MEM alone.
register_pipeline(
    "mkt_two_stage",
    (_MEM, Stage("tem", "tem", "target", pretrained_from="mem", target_rows="holdout")),
)
# Ablations (Table 4): w/o MEM is TEM alone; w/o TEM is the MEM alone, its target tower. With
# no TEM to hold rows out for, it trains on every target train row, as the paper's MEM does
# (docs/model.md, TEM choice 2: on the 70% MKT's MEM had until stop 27 it lost 0.005
# validation AUC).
# (w/o PDL and w/o HFA are MKT with mem.gamma=0 / mem.hfa=false.)
register_pipeline("tem_only", (Stage("tem", "tem", "target"),))
register_pipeline("mem_only", (Stage("mem", "mem", "both"),))


def pipeline(name: str) -> tuple[Stage, ...]:
    """The stages of a named pipeline; any registered model alone is a one-stage pipeline."""
    if name in PIPELINES:
        return PIPELINES[name]
    if name in MODELS:
        return (Stage(name, name, MODELS[name].train_entities),)
    raise ConfigError(
        f"model: {name!r} is neither a pipeline {sorted(PIPELINES)} nor a model {sorted(MODELS)}"
    )


__all__ = ["PIPELINES", "Stage", "pipeline"]
