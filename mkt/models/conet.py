"""CoNet (Hu et al., 2018) as a joint cross-domain model: one network per entity, linked by
cross-connection units (a transfer matrix per layer, shared by both directions).

Entity e's network reads that entity's full row, [v_u || v_seq || v_shared || v_spec(e)];
the embeddings (user above all) are shared, as in the paper. Every row runs through every
network (on another entity's row the specific fields are padding, i.e. zeros), so each
network can read the others' hidden layers; the row's logit is its own entity's network's.
Each network is [128, 64, 16, 1], cross-connected between its hidden layers.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from mkt.contract import ConfigError
from mkt.features import Batch
from mkt.layers.cross_connection import CrossConnectionNetworks
from mkt.layers.towers import EntityTowers
from mkt.models._baselines import (
    ATTENTION_HIDDEN,
    EMBEDDING_DIM,
    JOINT_SHARED,
    JOINT_TOWER,
    JointModel,
    dropout_rate,
    layer_sizes,
)
from mkt.registry import register
from mkt.schema import FeatureSchema


@register("conet")
class CoNet(JointModel):
    defaults: ClassVar[dict[str, Any]] = {
        "embedding_dim": EMBEDDING_DIM,
        "attention_hidden": ATTENTION_HIDDEN,  # sequence target attention, shared by entities
        "hidden": JOINT_SHARED + JOINT_TOWER,  # each entity's network, the last one the logit
        "dropout": 0.0,
    }

    def __init__(self, schema: FeatureSchema, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(schema, params)
        hidden = layer_sizes(self, "hidden", logit=True)
        if len(hidden) < 2:
            raise ConfigError(f"CoNet.hidden: needs a hidden layer before the logit, got {hidden}")
        dropout = dropout_rate(self)
        self.networks = CrossConnectionNetworks(
            [self.common_dim + d for d in self.specific_dims], hidden[:-1], dropout
        )
        self.output = EntityTowers([self.networks.out_dim] * len(self.entities), hidden[-1:])
        self.init_tower_biases(self.output)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        common, specific = self.encode(batch)
        hidden = self.networks([torch.cat([common, s], dim=1) for s in specific])
        return {"logit": self.output(hidden, batch["entity_index"]).squeeze(-1)}
