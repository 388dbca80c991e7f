"""MLP baseline (section 4.1.2): embedding layer, fully connected layers, output layer.

Single-domain: trained on the target entity's rows only. Reads every field of a target row
(user, both behaviour sequences mean-pooled, shared, target-specific) concatenated, into the
DNN [128, 64, 16, 1] of section 4.1.3.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from mkt.features import Batch
from mkt.layers.mlp import MLP
from mkt.models._baselines import (
    EMBEDDING_DIM,
    SINGLE_DNN,
    SingleEntityModel,
    dropout_rate,
    layer_sizes,
)
from mkt.registry import register
from mkt.schema import FeatureSchema


@register("mlp")
class MLPModel(SingleEntityModel):
    defaults: ClassVar[dict[str, Any]] = {
        "embedding_dim": EMBEDDING_DIM,
        "hidden": SINGLE_DNN,  # DNN layer widths, the last one the logit
        # Chosen on validation (docs/baselines.md, MLP): without it one seed in three stopped
        # at epoch 1, below the regression.
        "dropout": 0.5,
    }

    def __init__(self, schema: FeatureSchema, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(schema, params)
        self.dnn = MLP(
            self.input_dim,
            layer_sizes(self, "hidden", logit=True),
            dropout_rate(self),
            last_activation=False,
        )
        self.init_output_bias(self.dnn, self.entity)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"logit": self.dnn(self.fields(batch)).squeeze(-1)}
