"""DCN v1 cross network (Wang et al., 2017): x_{l+1} = x_0 (x_l . w_l) + b_l + x_l."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CrossNetwork(nn.Module):
    def __init__(self, in_dim: int, num_layers: int = 2) -> None:
        super().__init__()
        self.weights = nn.ParameterList(
            [nn.Parameter(torch.randn(in_dim) * in_dim**-0.5) for _ in range(num_layers)]
        )
        self.biases = nn.ParameterList(
            [nn.Parameter(torch.zeros(in_dim)) for _ in range(num_layers)]
        )
        self.out_dim = in_dim

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for w, b in zip(self.weights, self.biases, strict=True):
            x = x0 * (x @ w).unsqueeze(-1) + b + x
        return x
