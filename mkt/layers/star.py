"""Star-topology fully connected network of STAR (Sheng et al., 2021).

Each layer has shared centre parameters (W, b) and per-domain parameters (W_p, b_p); a row of
domain p goes through W ⊙ W_p and b + b_p. Domain weights start at one and domain biases at
zero, so training starts from the shared network. Every domain's layer runs on every row and
each row keeps its own domain's output (few domains; no data-dependent shapes).
"""

from __future__ import annotations

import math
from itertools import pairwise

import torch
from torch import Tensor, nn

from mkt.layers.towers import pick_entity


class StarMLP(nn.Module):
    def __init__(
        self, in_dim: int, hidden: list[int], num_domains: int, dropout: float = 0.0
    ) -> None:
        """`hidden` ends with the output width; ReLU after every layer but the last."""
        super().__init__()
        dims = list(pairwise([in_dim, *hidden]))
        self.weight = nn.ParameterList([nn.Parameter(torch.empty(a, b)) for a, b in dims])
        self.bias = nn.ParameterList([nn.Parameter(torch.zeros(b)) for _, b in dims])
        self.domain_weight = nn.ParameterList(
            [nn.Parameter(torch.ones(num_domains, a, b)) for a, b in dims]
        )
        self.domain_bias = nn.ParameterList(
            [nn.Parameter(torch.zeros(num_domains, b)) for _, b in dims]
        )
        for w, (a, _) in zip(self.weight, dims, strict=True):
            nn.init.uniform_(w, -1 / math.sqrt(a), 1 / math.sqrt(a))  # as nn.Linear
        self.dropout = nn.Dropout(dropout)
        self.out_dim = hidden[-1]

    def forward(self, x: Tensor, domain: Tensor) -> Tensor:
        """`x` `[B, in_dim]`, `domain` `[B]` -> `[B, out_dim]`."""
        last = len(self.weight) - 1
        for i, (w, b, dw, db) in enumerate(
            zip(self.weight, self.bias, self.domain_weight, self.domain_bias, strict=True)
        ):
            per_domain = torch.einsum("ba,dao->dbo", x, w * dw)  # [D, B, out]
            x = pick_entity(per_domain, domain) + b + db[domain]
            if i < last:
                x = self.dropout(torch.relu(x))
        return x
