"""One extraction level of PLE (Tang et al., 2020): Customized Gate Control with progressive
routing.

Each task (here: entity) has its own experts and a gate over [its own experts, the shared
experts]; the shared path has shared experts and, below the last level, a gate over every
expert of the level. Stacking levels is PLE's progressive layered extraction: level j's task
and shared outputs are level j+1's task and shared inputs.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mkt.layers.mlp import MLP


def _mix(gate_logits: Tensor, experts: Tensor) -> Tensor:
    """Softmax gate `[B, E]` over expert outputs `[B, E, H]` -> `[B, H]`."""
    return torch.bmm(torch.softmax(gate_logits, dim=-1).unsqueeze(1), experts).squeeze(1)


class ExtractionLayer(nn.Module):
    def __init__(
        self,
        task_in_dims: list[int],
        shared_in_dim: int,
        out_dim: int,
        num_specific: int,
        num_shared: int,
        shared_gate: bool,
        dropout: float = 0.0,
    ) -> None:
        """`task_in_dims[t]`: width of task t's input; `shared_gate`: whether this level
        feeds a next level's shared experts (false on the last level)."""
        super().__init__()
        if num_specific < 1 or num_shared < 1:
            raise ValueError("ExtractionLayer needs num_specific >= 1 and num_shared >= 1")
        self.specific = nn.ModuleList(
            [
                nn.ModuleList([MLP(d, [out_dim], dropout) for _ in range(num_specific)])
                for d in task_in_dims
            ]
        )
        self.shared = nn.ModuleList(
            [MLP(shared_in_dim, [out_dim], dropout) for _ in range(num_shared)]
        )
        self.task_gates = nn.ModuleList(
            [nn.Linear(d, num_specific + num_shared) for d in task_in_dims]
        )
        num_all = len(task_in_dims) * num_specific + num_shared
        self.shared_gate = nn.Linear(shared_in_dim, num_all) if shared_gate else None
        self.out_dim = out_dim

    def forward(
        self, task_inputs: list[Tensor], shared_input: Tensor
    ) -> tuple[list[Tensor], Tensor | None]:
        """Each task's output `[B, out_dim]`, and the shared output (None on the last level)."""
        shared = torch.stack([e(shared_input) for e in self.shared], dim=1)
        specific = [
            torch.stack([e(x) for e in experts], dim=1)
            for experts, x in zip(self.specific, task_inputs, strict=True)
        ]
        task_out = [
            _mix(gate(x), torch.cat([own, shared], dim=1))
            for gate, x, own in zip(self.task_gates, task_inputs, specific, strict=True)
        ]
        if self.shared_gate is None:
            return task_out, None
        every = torch.cat([*specific, shared], dim=1)
        return task_out, _mix(self.shared_gate(shared_input), every)
