"""Collaborative cross networks of CoNet (Hu et al., 2018).

One MLP per domain; from the second hidden layer on, each network also reads the others'
previous layer through a transfer matrix H^l shared by all directions (the paper's
cross-connection unit):

    a_e^{l+1} = ReLU(W_e^l a_e^l + H^l Σ_{e' ≠ e} a_{e'}^l)

With two domains the sum is the other domain's layer, as in the paper.
"""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import Tensor, nn


class CrossConnectionNetworks(nn.Module):
    def __init__(self, in_dims: list[int], hidden: list[int], dropout: float = 0.0) -> None:
        """`in_dims[e]`: width of domain e's input; `hidden`: widths of every network's
        layers (ReLU after each)."""
        super().__init__()
        if not hidden:
            raise ValueError("CrossConnectionNetworks needs at least one hidden layer")
        self.first = nn.ModuleList([nn.Linear(d, hidden[0]) for d in in_dims])
        self.own = nn.ModuleList(
            [nn.ModuleList([nn.Linear(a, b) for a, b in pairwise(hidden)]) for _ in in_dims]
        )
        self.transfer = nn.ModuleList([nn.Linear(a, b, bias=False) for a, b in pairwise(hidden)])
        self.dropout = nn.Dropout(dropout)
        self.out_dim = hidden[-1]

    def forward(self, inputs: list[Tensor]) -> list[Tensor]:
        """`inputs[e]` `[B, in_dims[e]]` -> each network's last layer `[B, out_dim]`."""
        acts = [self.dropout(torch.relu(f(x))) for f, x in zip(self.first, inputs, strict=True)]
        for level, transfer in enumerate(self.transfer):
            total = torch.stack(acts).sum(0)
            acts = [
                self.dropout(torch.relu(own[level](a) + transfer(total - a)))
                for own, a in zip(self.own, acts, strict=True)
            ]
        return acts
