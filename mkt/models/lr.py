"""Logistic regression: the one-hot "wide" floor every deep model is compared with.

Single-domain: trained on the target entity's rows only, through the same runner and recipe
as the deep models (the L2 of the embedding rows is the L2 of these one-hot weights). One
weight per value of every user, shared and target-specific feature, plus a bias:

    logit = b + sum_f w_f[x_f]

No behaviour sequence (a one-hot model reads fields, not bags) and no interaction: a deep
model that scores below this on the same rows is a defect to find (docs/RESULTS.md).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from mkt.features import Batch
from mkt.layers.first_order import FirstOrder
from mkt.models.base import CTRModel
from mkt.registry import register
from mkt.schema import FeatureSchema


@register("lr")
class LogisticRegression(CTRModel):
    train_entities = "target"
    # One-hot weights start at 0, as a convex model may: nothing to break symmetry.
    defaults: ClassVar[dict[str, Any]] = {"embedding_init_std": 0.0}

    def __init__(self, schema: FeatureSchema, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(schema, params)
        self.entity = schema.target_entity
        self.names = [
            f.name
            for f in (
                *schema.user_features,
                *schema.shared_features,
                *schema.specific_features(self.entity),
            )
        ]
        self.wide = FirstOrder(schema, self.names, init_std=self.params["embedding_init_std"])
        self.bias = nn.Parameter(torch.tensor(self.prior_logit(self.entity)))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        return {"logit": self.wide(batch) + self.bias}
