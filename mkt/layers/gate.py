"""GLU gate (Dauphin et al., 2017): Linear(x) * sigmoid(Linear'(x)).

TEM filters each knowledge vector plugged from MEM through one of these (paper eq. 12)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class GLUGate(nn.Module):
    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.value = nn.Linear(in_dim, out_dim)
        self.gate = nn.Linear(in_dim, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x))
