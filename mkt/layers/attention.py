"""DIN target attention (Zhou et al., 2018): a behaviour sequence pooled by its relevance to
the candidate item.

The activation unit scores each key from `[q, k, q - k, q * k]`; as in DIN the weights are not
softmax-normalised, so the pooled vector keeps the intensity of the user's interest. Masked
slots get weight 0, so a row with an empty sequence pools to zeros.

Only the real slots are scored: behaviour sequences are mostly padding (1.8 of the quick
start's 40 slots a row hold an item), and the activation unit on every slot was the largest
cost of a training step (docs/BENCHMARKS.md, "Training throughput"). A graph being traced
(torch.export, TorchScript) scores every slot and masks the weights instead, the same value,
so its shapes do not depend on the data.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from mkt.layers.mlp import MLP


class TargetAttention(nn.Module):
    def __init__(self, dim: int, hidden: list[int] | None = None) -> None:
        super().__init__()
        hidden = [32, 16] if hidden is None else hidden
        self.unit = MLP(4 * dim, hidden, activation="prelu")
        self.score = nn.Linear(self.unit.out_dim, 1)

    def weigh(self, query: Tensor, keys: Tensor) -> Tensor:
        """Activation unit: `query`, `keys` `[..., d]` -> weights `[...]`."""
        features = torch.cat([query, keys, query - keys, query * keys], dim=-1)
        return self.score(self.unit(features)).squeeze(-1)

    def forward(self, query: Tensor, keys: Tensor, mask: Tensor) -> Tensor:
        """`query` `[B, d]`, `keys` `[B, L, d]`, `mask` `[B, L]` -> `[B, d]`."""
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            weights = self.weigh(query.unsqueeze(1).expand_as(keys), keys)
            weights = weights * mask.to(keys.dtype)
            return torch.bmm(weights.unsqueeze(1), keys).squeeze(1)
        rows, slots = mask.nonzero(as_tuple=True)  # the real slots, [n] each
        return self.pool(query, keys[rows, slots], rows)

    def pool(self, query: Tensor, real: Tensor, rows: Tensor) -> Tensor:
        """The real slots only: `real` `[n, d]` their keys, `rows` `[n]` the row each belongs
        to -> `[B, d]` (what `EmbeddingBank.gather` gives a sequence)."""
        weighted = self.weigh(query[rows], real).unsqueeze(-1) * real
        return query.new_zeros(query.shape).index_add(0, rows, weighted)
