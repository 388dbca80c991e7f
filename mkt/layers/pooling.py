"""Mean pooling of a behaviour sequence: the plain "Embedding & MLP" way of reading a sequence
(the base model of the DIN paper), used by the baselines that have no attention.

It takes the same call as `TargetAttention` and ignores the query, so `EntityInputs` can take
it as its sequence pooler.
"""

from __future__ import annotations

from torch import Tensor, nn


class MeanPooling(nn.Module):
    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """`keys` `[B, L, d]`, `mask` `[B, L]` -> `[B, d]`; an empty sequence pools to zeros."""
        weights = mask.to(keys.dtype).unsqueeze(-1)
        return (keys * weights).sum(1) / weights.sum(1).clamp_min(1.0)
