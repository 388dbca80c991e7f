"""SENET layer of FiBiNet (Huang et al., 2019): learns a weight per feature field.

Squeeze: each field's embedding to its mean. Excitation: two fully connected layers with ReLU
(the paper's A = ReLU(W2 ReLU(W1 Z)), no biases), the middle one `num_fields / reduction`
wide. Re-weight: each field's embedding times its weight.
"""

from __future__ import annotations

from torch import Tensor, nn


class SENet(nn.Module):
    def __init__(self, num_fields: int, reduction: int = 3) -> None:
        super().__init__()
        middle = max(1, num_fields // reduction)
        self.excitation = nn.Sequential(
            nn.Linear(num_fields, middle, bias=False),
            nn.ReLU(),
            nn.Linear(middle, num_fields, bias=False),
            nn.ReLU(),
        )

    def forward(self, fields: Tensor) -> Tensor:
        """`[B, F, d]` -> `[B, F, d]`."""
        weights = self.excitation(fields.mean(dim=-1))
        return fields * weights.unsqueeze(-1)
