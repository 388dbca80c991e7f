"""One tower per entity for the joint models: each row of a mixed batch is scored by the tower
of its own entity (`batch["entity_index"]`).

Every tower runs on every row and each row keeps its own entity's output: the towers are small,
and this keeps the forward free of data-dependent shapes (no host sync, one graph for any mix).
Rows of another entity get no gradient from a tower, since their outputs are dropped.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mkt.layers.mlp import MLP


def pick_entity(per_entity: Tensor, entity_index: Tensor) -> Tensor:
    """`per_entity` `[E, B, ...]` (one slice per entity) -> `[B, ...]`, row b from slice
    `entity_index[b]`."""
    rows = torch.arange(per_entity.shape[1], device=per_entity.device)
    return per_entity[entity_index, rows]


class EntityTowers(nn.Module):
    def __init__(self, in_dims: list[int], hidden: list[int], dropout: float = 0.0) -> None:
        """`in_dims[e]`: width of entity e's tower input; `hidden` ends with the output width
        (1 for a logit) and has no activation after its last layer."""
        super().__init__()
        self.towers = nn.ModuleList(
            [MLP(d, hidden, dropout, last_activation=False) for d in in_dims]
        )
        self.out_dim = hidden[-1]

    def forward(self, inputs: list[Tensor], entity_index: Tensor) -> Tensor:
        """`inputs[e]` `[B, in_dims[e]]` -> `[B, out_dim]`."""
        outs = torch.stack([t(x) for t, x in zip(self.towers, inputs, strict=True)])
        return pick_entity(outs, entity_index)
