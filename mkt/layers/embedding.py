"""One embedding table per feature, built from the feature schema (the paper's eq. 1-2).

Index 0 (padding, also "not applicable" for the other entity's specific features) embeds to
zeros and gets no gradient. Indices the table cannot hold (a schema from another run, samples
encoded with another vocabulary) are read as out-of-vocabulary (index 2) instead of crashing
the lookup. An exported serving graph leaves this guard out (`range_guard = False` while it
is traced): its encoder only ever produces indices of the artifact's own vocabularies, and
the guard was 5 of every lookup's 6 operators, 40% of the graph's (docs/serving.md).

The bank also owns the L2 regularisation of its rows (`l2_penalty`): it reads only the rows
a batch touches, so it stays cheap and sparse however large the tables grow, yet over an
epoch it weighs every row as an L2 term on the whole table would (docs/training.md).

With `sparse_gradients` on, every lookup (and the L2) gives its table a sparse gradient: the
rows a batch touches, not a dense tensor of the table's size, so a row-wise optimiser
(`torch.optim.SparseAdam`) updates only those rows. At Tenrec's vocabularies the dense
table step alone bounds a CPU worker (docs/BENCHMARKS.md, "Embedding tables").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mkt.contract import OOV, PAD
from mkt.features import Batch
from mkt.schema import FeatureSchema

INIT_STD = 0.05


class EmbeddingBank(nn.Module):
    def __init__(
        self,
        schema: FeatureSchema,
        dim: int = 8,
        names: list[str] | None = None,
        init_std: float = INIT_STD,
    ) -> None:
        super().__init__()
        scalar = [f for f in schema.features if f.group != "sequence"]
        if names is not None:
            known = {f.name for f in scalar}
            unknown = [n for n in names if n not in known]
            if unknown:
                raise KeyError(f"EmbeddingBank: {unknown} are not non-sequence schema features")
            scalar = [f for f in scalar if f.name in names]
        if init_std < 0:
            raise ValueError(f"EmbeddingBank.init_std: must be >= 0, got {init_std}")
        self.dim = dim
        self.item_feature = schema.item_feature
        self.length_columns = {f.name: f.length_column for f in schema.sequences}
        self.tables = nn.ModuleDict(
            {f.name: nn.Embedding(f.vocab_size, dim, padding_idx=PAD) for f in scalar}
        )
        for table in self.tables.values():
            nn.init.normal_(table.weight, std=init_std)
            with torch.no_grad():
                table.weight[PAD].zero_()
        # Per table, how many of an epoch's batches touch each row (`count_rows`); data, not
        # weights, so not a buffer: checkpoints and exported models do not carry it.
        self.touch_counts: dict[str, torch.Tensor] = {}
        self.range_guard = True

    @property
    def sparse_gradients(self) -> bool:
        return any(table.sparse for table in self.tables.values())

    def use_sparse_gradients(self, sparse: bool = True, min_rows: int = 0) -> None:
        """Sparse gradients for the tables of at least `min_rows` rows (dense for the others,
        whose whole-table step costs less than a sparse step's bookkeeping)."""
        # nn.Embedding reads `sparse` at each forward, so a built model can switch.
        for table in self.tables.values():
            table.sparse = sparse and table.num_embeddings >= min_rows

    def lookup(self, name: str, index: torch.Tensor) -> torch.Tensor:
        if name not in self.tables:
            raise KeyError(f"EmbeddingBank has no table for feature {name!r}")
        table = self.tables[name]
        return table(self.clamp(name, index) if self.range_guard else index)

    def clamp(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """`index` with what the table cannot hold read as OOV."""
        size = self.tables[name].num_embeddings
        return torch.where((index < 0) | (index >= size), torch.full_like(index, OOV), index)

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
        return self.lookup(self.item_feature, items), self.sequence_mask(batch, seq_name)

    def sequence_mask(self, batch: Batch, seq_name: str) -> torch.Tensor:
        items = batch[seq_name]
        length = batch[self.length_columns[seq_name]]
        positions = torch.arange(items.shape[1], device=items.device)
        return positions.unsqueeze(0) < length.unsqueeze(1)

    def touched_rows(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Per table, the distinct rows this batch reads (its feature column, and for the item
        table every real slot of every sequence), padding left out: it has no gradient."""
        touched: dict[str, torch.Tensor] = {}
        for name in self.tables:
            parts = [batch[name].reshape(-1)] if name in batch else []
            if name == self.item_feature:
                parts += [batch[s][self.sequence_mask(batch, s)] for s in self.length_columns]
            if parts:
                rows = torch.unique(self.clamp(name, torch.cat(parts)))
                touched[name] = rows[rows != PAD]
        return touched

    def reset_touch_counts(self, device: torch.device | str = "cpu") -> None:
        """Zero counts for every table (before the counting pass)."""
        self.touch_counts.clear()
        for name, table in self.tables.items():
            self.touch_counts[name] = torch.zeros(table.num_embeddings, device=device)

    def count_rows(self, batch: Batch) -> None:
        """Add one to every row `batch` touches: `reset_touch_counts`, then this over an
        epoch's batches, is the counting pass `l2_penalty` needs."""
        for name, rows in self.touched_rows(batch).items():
            self.touch_counts[name][rows] += 1

    def l2_penalty(self, batch: Batch) -> torch.Tensor:
        """Sum of ||w||^2 / n_w over the rows w that `batch` touches, n_w being the number of
        an epoch's batches that touch w (`count_rows`). Summed over an epoch's batches, every
        row then counts ||w||^2 once, rare and frequent rows alike, as in an L2 term on the
        whole table: DIN's mini-batch aware regularisation (Zhou et al. 2018, section 4.3),
        without reading the rows a batch does not touch. Frozen tables are left out."""
        total = torch.zeros((), device=next(self.parameters()).device)
        for name, rows in self.touched_rows(batch).items():
            table = self.tables[name]
            if not table.weight.requires_grad:
                continue
            if name not in self.touch_counts:
                raise RuntimeError(
                    f"EmbeddingBank.l2_penalty: no touch counts for {name!r}; run count_rows "
                    "over the training batches first"
                )
            touches = self.touch_counts[name][rows].clamp(min=1.0)
            # Looked up like a feature, not indexed: a sparse table keeps a sparse gradient.
            weights = F.embedding(rows, table.weight, sparse=table.sparse)
            total = total + (weights.pow(2).sum(1) / touches).sum()
        return total

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
        bank.touch_counts = self.touch_counts
        bank.range_guard = self.range_guard
        return bank
