"""MMoE (Ma et al., 2018): shared experts, one softmax gate per task; here per entity.

Every row of a mixed batch is mixed by its own gate (`gate_index`, e.g. its entity), so one
forward serves source and target rows together.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mkt.layers.mlp import MLP


class MMoE(nn.Module):
    def __init__(
        self,
        in_dim: int,
        num_experts: int,
        expert_hidden: list[int],
        num_gates: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if num_experts < 1 or num_gates < 1 or not expert_hidden:
            raise ValueError("MMoE needs num_experts >= 1, num_gates >= 1 and expert_hidden")
        self.experts = nn.ModuleList(
            [MLP(in_dim, expert_hidden, dropout) for _ in range(num_experts)]
        )
        self.gates = nn.ModuleList([nn.Linear(in_dim, num_experts) for _ in range(num_gates)])
        self.out_dim = expert_hidden[-1]

    def forward(self, x: Tensor, gate_index: Tensor) -> Tensor:
        experts = torch.stack([e(x) for e in self.experts], dim=1)  # [B, E, H]
        logits = torch.stack([g(x) for g in self.gates], dim=1)  # [B, G, E]
        rows = torch.arange(x.shape[0], device=x.device)
        weights = torch.softmax(logits[rows, gate_index], dim=-1)  # [B, E]
        return torch.bmm(weights.unsqueeze(1), experts).squeeze(1)

    def select_gates(self, keep: list[int]) -> MMoE:
        """An MMoE with only the gates `keep` (renumbered 0..), sharing all parameters with
        this one: the serving graph of one entity carries no other entity's gate."""
        sub = MMoE.__new__(MMoE)
        nn.Module.__init__(sub)
        sub.experts = self.experts
        sub.gates = nn.ModuleList([self.gates[i] for i in keep])
        sub.out_dim = self.out_dim
        return sub
