"""One embedding table per feature, built from the feature schema (the paper's eq. 1-2).

Index 0 (padding, also "not applicable" for the other entity's specific features) embeds to
zeros and gets no gradient. Indices the table cannot hold (a schema from another run, a
serving request with a stale vocabulary) are read as out-of-vocabulary (index 2) instead of
crashing the lookup.
"""

from __future__ import annotations

import torch
from torch import nn

from mkt.features import Batch
from mkt.schema import FeatureSchema

PADDING = 0
OOV = 2


class EmbeddingBank(nn.Module):
    def __init__(self, schema: FeatureSchema, dim: int = 8, names: list[str] | None = None) -> None:
        super().__init__()
        scalar = [f for f in schema.features if f.group != "sequence"]
        if names is not None:
            known = {f.name for f in scalar}
            unknown = [n for n in names if n not in known]
            if unknown:
                raise KeyError(f"EmbeddingBank: {unknown} are not non-sequence schema features")
            scalar = [f for f in scalar if f.name in names]
        self.dim = dim
        self.item_feature = schema.item_feature
        self.length_columns = {f.name: f.length_column for f in schema.sequences}
        self.tables = nn.ModuleDict(
            {f.name: nn.Embedding(f.vocab_size, dim, padding_idx=PADDING) for f in scalar}
        )
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=0.05)
            with torch.no_grad():
                table.weight[PADDING].zero_()

    def lookup(self, name: str, index: torch.Tensor) -> torch.Tensor:
        if name not in self.tables:
            raise KeyError(f"EmbeddingBank has no table for feature {name!r}")
        table = self.tables[name]
        index = torch.where(
            (index < 0) | (index >= table.num_embeddings), torch.full_like(index, OOV), index
        )
        return table(index)

    def forward(self, batch: Batch, names: list[str]) -> torch.Tensor:
        """`[B, len(names), dim]`: the embeddings of the named features, in that order."""
        if not names:
            rows = batch["entity_index"].shape[0]
            return batch["entity_index"].new_zeros((rows, 0, self.dim), dtype=torch.float32)
        return torch.stack([self.lookup(n, batch[n]) for n in names], dim=1)

    def sequence(self, batch: Batch, seq_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A behaviour sequence through the shared item table: `[B, L, dim]` and the mask of
        real slots `[B, L]` (from the sequence's length column)."""
        if seq_name not in self.length_columns:
            raise KeyError(f"{seq_name!r} is not a sequence of the schema")
        items = batch[seq_name]
        length = batch[self.length_columns[seq_name]]
        positions = torch.arange(items.shape[1], device=items.device)
        mask = positions.unsqueeze(0) < length.unsqueeze(1)
        return self.lookup(self.item_feature, items), mask

    def subset(self, names: list[str]) -> EmbeddingBank:
        """A bank holding only the named tables, sharing their parameters with this one
        (e.g. a serving graph without the other entity's specific features)."""
        missing = [n for n in names if n not in self.tables]
        if missing:
            raise KeyError(f"EmbeddingBank.subset: no tables for {missing}")
        bank = EmbeddingBank.__new__(EmbeddingBank)
        nn.Module.__init__(bank)
        bank.dim = self.dim
        bank.item_feature = self.item_feature
        bank.length_columns = dict(self.length_columns)
        bank.tables = nn.ModuleDict({n: self.tables[n] for n in names})
        return bank
