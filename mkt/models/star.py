"""STAR (Sheng et al., 2021) as a joint cross-domain model: partitioned normalisation, a
star-topology FCN (shared weights times per-domain weights) and an auxiliary network.

Input: the union of all entities' fields, [v_u || v_seq || v_shared || v_spec(e_1) || ...],
where a row's other-entity fields are padding (zeros). Domain p's layers see only its own
specific fields: the other columns are zero on its rows (PN's per-domain statistics keep them
at a constant, which the bias absorbs). The auxiliary network reads the domain indicator
embedding and the entity-specific fields, the features that depict the domain; its output is
added to the main logit. The star FCN is [128, 64, 16, 1], every layer shared x per-domain
(the paper's [128, 64] shared plus [16, 1] tower).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from mkt.features import Batch
from mkt.layers.mlp import MLP
from mkt.layers.partitioned_norm import PartitionedNorm
from mkt.layers.star import StarMLP
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


@register("star")
class STAR(JointModel):
    defaults: ClassVar[dict[str, Any]] = {
        "embedding_dim": EMBEDDING_DIM,
        "attention_hidden": ATTENTION_HIDDEN,  # sequence target attention, shared by entities
        "hidden": JOINT_SHARED + JOINT_TOWER,  # star FCN layers, the last one the logit
        "aux_hidden": JOINT_TOWER,  # auxiliary network, the last one the logit
        "dropout": 0.0,
    }

    def __init__(self, schema: FeatureSchema, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(schema, params)
        dim = self.params["embedding_dim"]
        dropout = dropout_rate(self)
        num_domains = len(self.entities)
        in_dim = self.common_dim + sum(self.specific_dims)
        self.norm = PartitionedNorm(in_dim, num_domains)
        self.star = StarMLP(in_dim, layer_sizes(self, "hidden", logit=True), num_domains, dropout)
        self.domain_embedding = nn.Embedding(num_domains, dim)
        self.auxiliary = MLP(
            dim + sum(self.specific_dims),
            layer_sizes(self, "aux_hidden", logit=True),
            dropout,
            last_activation=False,
        )
        nn.init.zeros_([m for m in self.auxiliary.modules() if isinstance(m, nn.Linear)][-1].bias)
        # The per-domain bias of the star FCN's logit layer: each domain starts at its
        # entity's train like rate (the shared bias and the auxiliary network's start at 0).
        with torch.no_grad():
            for i, entity in enumerate(self.entities):
                self.star.domain_bias[-1][i].fill_(self.prior_logit(entity))

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        common, specific = self.encode(batch)
        domain = batch["entity_index"]
        main = self.star(self.norm(torch.cat([common, *specific], dim=1), domain), domain)
        aux = self.auxiliary(torch.cat([self.domain_embedding(domain), *specific], dim=1))
        return {"logit": (main + aux).squeeze(-1)}
