"""Mean pooling of a behaviour sequence: the plain "Embedding & MLP" way of reading a sequence
(the base model of the DIN paper), used by the baselines that have no attention.

It takes the same calls as `TargetAttention` (`forward` on padded keys, `pool` on the real
slots only) and ignores the query, so `EntityInputs` can take it as its sequence pooler.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MeanPooling(nn.Module):
    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """`keys` `[B, L, d]`, `mask` `[B, L]` -> `[B, d]`; an empty sequence pools to zeros."""
        weights = mask.to(keys.dtype).unsqueeze(-1)
        return (keys * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def pool(self, query: Tensor, real: Tensor, rows: Tensor) -> Tensor:
        """`real` `[n, d]` the real slots' keys, `rows` `[n]` their rows -> `[B, d]`."""
        total = query.new_zeros(query.shape).index_add(0, rows, real)
        count = torch.bincount(rows, minlength=query.shape[0]).clamp_min(1)
        return total / count.unsqueeze(-1).to(real.dtype)
