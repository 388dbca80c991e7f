"""DIN target attention (Zhou et al., 2018): a behaviour sequence pooled by its relevance to
the candidate item.

The activation unit scores each key from `[q, k, q - k, q * k]`; as in DIN the weights are not
softmax-normalised, so the pooled vector keeps the intensity of the user's interest. Masked
slots get weight 0, so a row with an empty sequence pools to zeros.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mkt.layers.mlp import MLP


class TargetAttention(nn.Module):
    def __init__(self, dim: int, hidden: list[int] | None = None) -> None:
        super().__init__()
        hidden = [32, 16] if hidden is None else hidden
        self.unit = MLP(4 * dim, hidden, activation="prelu")
        self.score = nn.Linear(self.unit.out_dim, 1)

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        q = query.unsqueeze(1).expand_as(keys)
        weights = self.score(self.unit(torch.cat([q, keys, q - keys, q * keys], dim=-1)))
        weights = weights.squeeze(-1) * mask.to(keys.dtype)
        return torch.bmm(weights.unsqueeze(1), keys).squeeze(1)
