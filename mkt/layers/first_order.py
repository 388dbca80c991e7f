"""The first-order ("wide") term of a CTR model: one learnt weight per value of each named
feature, summed into a logit (the linear part of Wide & Deep and DeepFM):

    wide(x) = sum_f w_f[x_f]

Its weights are 1-wide embedding tables, so the embedding L2 and a row-wise optimiser treat
them as every other table; they start at 0 (a convex term has no symmetry to break).
"""

from __future__ import annotations

import torch
from torch import nn

from mkt.features import Batch
from mkt.layers.embedding import EmbeddingBank
from mkt.schema import FeatureSchema


class FirstOrder(nn.Module):
    def __init__(self, schema: FeatureSchema, names: list[str], init_std: float = 0.0) -> None:
        super().__init__()
        self.names = list(names)
        self.weights = EmbeddingBank(schema, 1, self.names, init_std=init_std)

    def forward(self, batch: Batch) -> torch.Tensor:
        """`[B]`: the sum of the named features' weights."""
        return self.weights(batch, self.names).sum(dim=(1, 2))
