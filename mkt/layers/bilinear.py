"""Bilinear interaction of FiBiNet (Huang et al., 2019): p_ij = (v_i W) ⊙ v_j for every pair of
fields i < j, concatenated.

The paper's three ways to share W: one for all pairs (`field_all`), one per field i
(`field_each`), one per pair (`field_interaction`). All three are one weight tensor indexed
per pair.
"""

from __future__ import annotations

from itertools import combinations

import torch
from torch import Tensor, nn

BILINEAR_TYPES = ("field_all", "field_each", "field_interaction")


class BilinearInteraction(nn.Module):
    def __init__(self, num_fields: int, dim: int, kind: str = "field_interaction") -> None:
        super().__init__()
        if kind not in BILINEAR_TYPES:
            raise ValueError(f"BilinearInteraction: kind {kind!r} is not one of {BILINEAR_TYPES}")
        pairs = list(combinations(range(num_fields), 2))
        left = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        right = torch.tensor([j for _, j in pairs], dtype=torch.long)
        which = {
            "field_all": torch.zeros(len(pairs), dtype=torch.long),
            "field_each": left,
            "field_interaction": torch.arange(len(pairs)),
        }[kind]
        num_weights = {"field_all": 1, "field_each": num_fields, "field_interaction": len(pairs)}
        # Index tensors are derived from the shape, not learned: kept out of the state dict.
        self.register_buffer("left", left, persistent=False)
        self.register_buffer("right", right, persistent=False)
        self.register_buffer("which", which, persistent=False)
        self.weight = nn.Parameter(torch.empty(num_weights[kind], dim, dim))
        nn.init.xavier_normal_(self.weight)
        self.out_dim = len(pairs) * dim

    def forward(self, fields: Tensor) -> Tensor:
        """`[B, F, d]` -> `[B, F(F-1)/2 * d]`."""
        projected = torch.einsum("bpd,pde->bpe", fields[:, self.left], self.weight[self.which])
        return (projected * fields[:, self.right]).flatten(1)
