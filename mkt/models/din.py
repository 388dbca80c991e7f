"""DIN (Zhou et al., 2018): the MLP baseline with each behaviour sequence pooled by target
attention (the activation unit, query = the candidate item) instead of a mean.

`din` is single-domain (target rows only). The same network trained on the source entity's
rows, the pre-training stage of the Finetune and CTNet pipelines, is `din_source`
(`mkt/models/din_source.py`).
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from mkt.layers.attention import TargetAttention
from mkt.models._baselines import ATTENTION_HIDDEN, layer_sizes
from mkt.models.mlp import MLPModel
from mkt.registry import register


@register("din")
class DIN(MLPModel):
    defaults: ClassVar[dict[str, Any]] = {
        **MLPModel.defaults,
        # The MLP's 0.5 was chosen for the MLP alone; DIN and the models built on it
        # (SourceDIN, Finetune) keep the measured recipe they had.
        "dropout": 0.0,
        "attention_hidden": ATTENTION_HIDDEN,  # activation unit widths
    }

    def sequence_pooler(self, dim: int) -> nn.Module:
        return TargetAttention(dim, layer_sizes(self, "attention_hidden"))
