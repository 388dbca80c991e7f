"""PLE (Tang et al., 2020) as a joint cross-domain model: entity-specific and shared experts,
progressive routing through stacked extraction levels, one tower per entity.

An entity's own experts on the first level read that entity's full row,
[v_u || v_seq || v_shared || v_spec(entity)]; the shared experts read the common fields
[v_u || v_seq || v_shared]. One level per `expert_hidden` entry (defaults [128, 64]: the
paper's two shared layers), with one specific expert per entity and one shared expert, i.e.
as many experts as MMoE's 3 with two entities. Towers [16, 1].
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import torch

from mkt.features import Batch
from mkt.layers.cgc import ExtractionLayer
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


@register("ple")
class PLE(JointModel):
    defaults: ClassVar[dict[str, Any]] = {
        "embedding_dim": EMBEDDING_DIM,
        "attention_hidden": ATTENTION_HIDDEN,  # sequence target attention, shared by entities
        "expert_hidden": JOINT_SHARED,  # one extraction level per entry, experts that wide
        "num_specific_experts": 1,  # per entity and level
        "num_shared_experts": 1,  # per level
        "tower_hidden": JOINT_TOWER,  # each entity's tower, the last one the logit
        "dropout": 0.0,
    }

    def __init__(self, schema: FeatureSchema, params: Mapping[str, Any] | None = None) -> None:
        super().__init__(schema, params)
        dropout = dropout_rate(self)
        widths = layer_sizes(self, "expert_hidden")
        task_dims = [self.common_dim + d for d in self.specific_dims]
        shared_dim = self.common_dim
        levels = []
        for i, width in enumerate(widths):
            levels.append(
                ExtractionLayer(
                    task_dims,
                    shared_dim,
                    width,
                    positive(self, "num_specific_experts"),
                    positive(self, "num_shared_experts"),
                    shared_gate=i < len(widths) - 1,
                    dropout=dropout,
                )
            )
            task_dims, shared_dim = [width] * len(self.entities), width
        self.levels = torch.nn.ModuleList(levels)
        self.towers = EntityTowers(
            task_dims, layer_sizes(self, "tower_hidden", logit=True), dropout
        )
        self.init_tower_biases(self.towers)

    def forward(self, batch: Batch) -> dict[str, torch.Tensor]:
        common, specific = self.encode(batch)
        tasks: list[torch.Tensor] = [torch.cat([common, s], dim=1) for s in specific]
        shared: torch.Tensor | None = common
        for level in self.levels:
            assert shared is not None  # only the last level has no shared output
            tasks, shared = level(tasks, shared)
        return {"logit": self.towers(tasks, batch["entity_index"]).squeeze(-1)}
