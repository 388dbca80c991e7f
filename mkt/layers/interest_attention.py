"""Interest-level attention of MiNet (Ouyang et al., 2020): one weight per interest
(long-term, and a short-term one per domain's sequence), computed from all of them and the
candidate item:

    v_k = exp(g_k^T ReLU(V_k [p_u || a_1 || ... || a_n || q]) + b_k)

As in the paper the weights are not normalised across interests, so the model can scale all of
them up or down together. The exponent is clamped at `max_log_weight` so that a runaway score
cannot overflow (mixed-precision training); the paper has no clamp.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mkt.layers.mlp import MLP


class InterestLevelAttention(nn.Module):
    def __init__(
        self, in_dim: int, num_interests: int, hidden: int = 32, max_log_weight: float = 10.0
    ) -> None:
        super().__init__()
        self.nets = nn.ModuleList(
            [
                nn.Sequential(MLP(in_dim, [hidden]), nn.Linear(hidden, 1))
                for _ in range(num_interests)
            ]
        )
        self.max_log_weight = max_log_weight

    def forward(self, x: Tensor) -> Tensor:
        """`x` `[B, in_dim]` -> weights `[B, num_interests]` (positive)."""
        scores = torch.cat([net(x) for net in self.nets], dim=1)
        return torch.exp(scores.clamp(max=self.max_log_weight))
