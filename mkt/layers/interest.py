"""A factorised user x item interest term: the logit adds, for every field f that describes the
user (profile features, pooled behaviour sequences), the bilinear score <v_f W_f, v_item> with
the candidate item's vector.

Why beside the DNN: a like depends on how well the item matches what the user likes, a dot
product of two latent vectors, and an MLP over the concatenation [v_user || v_item] learns a
dot product poorly (docs/training.md, "Where the within-user signal is"); FiBiNet's bilinear
pairs, the one baseline that had them, ranked within users best. W_f starts at the identity,
so the term starts as the plain dot product of factorisation machines.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class InterestTerm(nn.Module):
    def __init__(self, num_fields: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.eye(dim).repeat(num_fields, 1, 1))  # [F, d, d]

    def forward(self, fields: Tensor, item: Tensor) -> Tensor:
        """`fields` `[B, F, d]`, `item` `[B, d]` -> logit term `[B]`."""
        return torch.einsum("bfd,fde,be->b", fields, self.weight, item)
