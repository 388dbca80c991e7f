"""MMoE (Ma et al., 2018) as a joint cross-domain model: shared experts, one gate and one tower
per entity.

Experts and gates read the fields every entity has, [v_u || v_seq || v_shared]; an entity's
specific fields join the gated expert mixture at the input of that entity's own tower. Sizes
(section 4.1.3): 3 experts of [128, 64], towers [16, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from mkt.features import Batch
from mkt.layers.mmoe import MMoE
from mkt.layers.towers import EntityTowers
from mkt.models._baselines import (
    ATTENTION_HIDDEN,
    EMBEDDING_DIM,
    JOINT_SHARED,
    JOINT_TOWER,
    JointModel,
    dropout_rate,
    layer_sizes,
    positive,
)
from mkt.registry import register
from mkt.schema import FeatureSchema


@register("mmoe")
class MMoEModel(JointModel):
    defaults: ClassVar[dict[str, Any]] = {
        "embedding_dim": EMBEDDING_DIM,
        "attention_hidden": ATTENTION_HIDDEN,  # sequence target attention, shared by entities
        "num_experts": 3,
        "expert_hidden": JOINT_SHARED,  # each expert's layers
        "tower_hidden": JOINT_TOWER,  # each entity's tower, the last one the logit
        "dropout": 0.0,
    }

    def __init__(self, schema: FeatureSchema, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(schema, params)
        dropout = dropout_rate(self)
        self.mmoe = MMoE(
            self.common_dim,
            positive(self, "num_experts"),
            layer_sizes(self, "expert_hidden"),
            num_gates=len(self.entities),
            dropout=dropout,
        )
        self.towers = EntityTowers(
            [self.mmoe.out_dim + d for d in self.specific_dims],
            layer_sizes(self, "tower_hidden", logit=True),
            dropout,
        )
        self.init_tower_biases(self.towers)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        common, specific = self.encode(batch)
        entity = batch["entity_index"]
        mixed = self.mmoe(common, entity)
        logit = self.towers([torch.cat([mixed, s], dim=1) for s in specific], entity)
        return {"logit": logit.squeeze(-1)}
