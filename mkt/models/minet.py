"""MiNet (Ouyang et al., 2020) as a joint cross-domain model: long-term interest across
domains, a short-term interest from each domain's behaviour sequence (item-level attention),
fused by interest-level attention.

For a row of entity e:
- long-term interest: the user profile embeddings v_u, shared by all entities;
- short-term interests: each entity's sequence pooled by that sequence's item-level attention
  (query: the candidate item and the user); the items of another entity's sequence pass
  through the sequence's transfer matrix in the attention score;
- interest-level attention of entity e weighs the interests (unnormalised, exp);
- [weighted interests || v_shared] -> shared layers [128, 64]; entity e's tower [16, 1]
  reads that output and e's specific fields.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from mkt.features import Batch
from mkt.layers.interest_attention import InterestLevelAttention
from mkt.layers.item_attention import ItemLevelAttention
from mkt.layers.mlp import MLP
from mkt.layers.pooling import MeanPooling
from mkt.layers.towers import EntityTowers, pick_entity
from mkt.models._baselines import (
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


@register("minet")
class MiNet(JointModel):
    defaults: ClassVar[dict[str, Any]] = {
        "embedding_dim": EMBEDDING_DIM,
        "item_attention_hidden": [32],  # item-level attention unit widths
        "interest_attention_hidden": 32,  # interest-level attention: one hidden layer
        "shared_hidden": JOINT_SHARED,
        "tower_hidden": JOINT_TOWER,  # each entity's tower, the last one the logit
        "dropout": 0.0,
    }

    def __init__(self, schema: FeatureSchema, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(schema, params)
        dim = self.params["embedding_dim"]
        dropout = dropout_rate(self)
        self.item_feature = schema.item_feature
        self.sequences = [(f.name, schema.entity_index(f.entity)) for f in schema.sequences]
        user_dim = dim * len(self.inputs.user_names)
        shared_dim = dim * len(self.inputs.shared_names)
        self.item_attention = nn.ModuleList(
            [
                ItemLevelAttention(dim, user_dim, layer_sizes(self, "item_attention_hidden"))
                for _ in self.sequences
            ]
        )
        interests_dim = user_dim + dim * len(self.sequences)
        self.interest_attention = nn.ModuleList(
            [
                InterestLevelAttention(
                    interests_dim + dim,
                    1 + len(self.sequences),
                    positive(self, "interest_attention_hidden"),
                )
                for _ in self.entities
            ]
        )
        self.bottom = MLP(interests_dim + shared_dim, layer_sizes(self, "shared_hidden"), dropout)
        self.towers = EntityTowers(
            [self.bottom.out_dim + d for d in self.specific_dims],
            layer_sizes(self, "tower_hidden", logit=True),
            dropout,
        )
        self.init_tower_biases(self.towers)

    def sequence_pooler(self, dim: int) -> nn.Module:
        # Sequences go through MiNet's own item-level attention; EntityInputs only embeds.
        return MeanPooling()

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        entity = batch["entity_index"]
        bank = self.inputs.embeddings
        user = self.inputs.user(batch)
        query = bank.lookup(self.item_feature, batch[self.item_feature])
        interests = [user]
        for (name, seq_entity), attention in zip(self.sequences, self.item_attention, strict=True):
            keys, mask = bank.sequence(batch, name)
            interests.append(attention(query, user, keys, mask, entity != seq_entity))
        weights = pick_entity(
            torch.stack(
                [att(torch.cat([*interests, query], 1)) for att in self.interest_attention]
            ),
            entity,
        )  # [B, 1 + n_seq]
        weighted = [x * weights[:, k : k + 1] for k, x in enumerate(interests)]
        hidden = self.bottom(torch.cat([*weighted, self.inputs.shared(batch)], dim=1))
        specific = [self.inputs.specific(batch, e) for e in self.entities]
        logit = self.towers([torch.cat([hidden, s], dim=1) for s in specific], entity)
        return {"logit": logit.squeeze(-1)}
