"""Item-level attention of MiNet (Ouyang et al., 2020): one domain's behaviour sequence pooled
by its relevance to the candidate item and the user.

    a_j = h^T ReLU(W [r_j || q || p_u || T(r_j) ⊙ q]),   α = softmax_j(a),   out = Σ_j α_j r_j

For a row of another domain than the sequence's, T is the transfer matrix M that maps this
domain's items into the candidate's space (the paper's M for clicked news seen by an ad row);
for a row of the sequence's own domain T is the identity. Unlike DIN's unit the weights are
softmax-normalised, as in the paper. Masked slots get weight 0; an empty sequence pools to
zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mkt.layers.mlp import MLP


class ItemLevelAttention(nn.Module):
    def __init__(self, dim: int, user_dim: int, hidden: list[int] | None = None) -> None:
        super().__init__()
        hidden = [32] if hidden is None else hidden
        self.transfer = nn.Linear(dim, dim, bias=False)
        self.unit = MLP(3 * dim + user_dim, hidden)
        self.score = nn.Linear(self.unit.out_dim, 1, bias=False)

    def forward(
        self,
        query: Tensor,
        user: Tensor,
        keys: Tensor,
        mask: Tensor,
        cross_domain: Tensor,
    ) -> Tensor:
        """`query` `[B, d]` (candidate item), `user` `[B, u]`, `keys` `[B, L, d]`, `mask`
        `[B, L]`, `cross_domain` bool `[B]` (row's domain differs from the sequence's)."""
        q = query.unsqueeze(1).expand_as(keys)
        u = user.unsqueeze(1).expand(-1, keys.shape[1], -1)
        mapped = torch.where(cross_domain[:, None, None], self.transfer(keys), keys)
        scores = self.score(self.unit(torch.cat([keys, q, u, mapped * q], dim=-1))).squeeze(-1)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        weights = torch.softmax(scores, dim=-1) * mask.to(keys.dtype)
        return torch.bmm(weights.unsqueeze(1), keys).squeeze(1)
