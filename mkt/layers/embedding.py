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

`gather` is the fused lookup a model's forward uses: per table, one lookup of the distinct
rows the batch reads (its own column, and for the item table every real slot of every
sequence), shared by the features, the sequences and the L2. A table's gradient is then one
entry per distinct row, not one per cell: the item table's sparse gradient shrinks from
`B * (1 + 2 * seq_len)` padded cells to the few thousand rows a batch really reads, which is
what DDP all-reduces (docs/BENCHMARKS.md, "Training throughput"). It equals the per-feature
lookups (`lookup`, `sequence`, tested with gradients), which traced graphs keep: a lookup
of distinct rows has data-dependent shapes.

With item attributes (`use_item_attributes`), an item's vector, as a candidate and in every
behaviour sequence, is its id row plus the rows of its attributes (its categories), as DIN
embeds goods with their category and EGES items with their side information: a liked item
seen a handful of times still says which categories the user likes (docs/model.md,
"Item attributes"). The item -> attribute maps are buffers, so checkpoints and exported
graphs carry them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mkt.contract import OOV, PAD
from mkt.features import Batch
from mkt.schema import FeatureSchema

INIT_STD = 0.05
# An item attribute's map (item index -> the attribute's index) is the buffer of this name.
ATTRIBUTE_BUFFER = "item_attribute__"


class BatchEmbeddings:
    """A batch's embeddings from one lookup per table (`EmbeddingBank.gather`)."""

    def __init__(
        self,
        empty: torch.Tensor,
        columns: dict[str, torch.Tensor],
        sequences: dict[str, tuple[torch.Tensor, torch.Tensor]],
        tables: dict[str, tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        self.empty = empty  # [B, 0, dim]: what no features embed to
        self.columns = columns  # feature -> [B, dim]
        self.sequences = sequences  # sequence -> (its real slots' keys [n, dim], their rows [n])
        self.tables = tables  # table -> (distinct rows read [m], their vectors [m, dim])

    def features(self, names: list[str]) -> torch.Tensor:
        """`[B, len(names), dim]`, as `EmbeddingBank.forward`."""
        if not names:
            return self.empty
        return torch.stack([self.columns[n] for n in names], dim=1)


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
        # Per sequence, the entity indices whose rows read it (`read_sequences`); absent:
        # every row reads it.
        self.sequence_readers: dict[str, tuple[int, ...]] = {}
        # The entity indices whose rows read this bank's feature columns (`read_by`); None:
        # every row.
        self.feature_readers: tuple[int, ...] | None = None
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
        # The training forward's `gather`, which `l2_penalty` of the same batch reads once.
        self.last_gathered: tuple[Batch, BatchEmbeddings] | None = None
        # Features whose rows add to their item's row (`use_item_attributes`).
        self.item_attributes: list[str] = []

    def use_item_attributes(self, maps: Mapping[str, torch.Tensor]) -> list[str]:
        """From now on an item's vector is its id row plus, per attribute this bank holds a
        table for, the row `maps[attribute][item]` (0, the padding row, where the item has no
        single value). Returns the attributes taken; none without the item table."""
        if self.item_feature not in self.tables:
            return []
        items = self.tables[self.item_feature].num_embeddings
        taken = []
        for name, values in maps.items():
            if name not in self.tables:
                continue
            if tuple(values.shape) != (items,):
                raise ValueError(
                    f"EmbeddingBank.use_item_attributes: the map of {name!r} has shape "
                    f"{tuple(values.shape)}, the item table {items} rows"
                )
            size = self.tables[name].num_embeddings
            if len(values) and (int(values.min()) < 0 or int(values.max()) >= size):
                raise ValueError(
                    f"EmbeddingBank.use_item_attributes: the map of {name!r} holds indices "
                    f"outside its table of {size} rows"
                )
            self._attribute(name, values)
            taken.append(name)
        return taken

    def _attribute(self, name: str, values: torch.Tensor) -> None:
        self.register_buffer(ATTRIBUTE_BUFFER + name, values.to(torch.long).clone())
        if name not in self.item_attributes:
            self.item_attributes.append(name)

    def with_attributes(self, rows: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
        """`vectors` (the item table's rows `rows`) plus their items' attribute rows."""
        for name in self.item_attributes:
            attribute = getattr(self, ATTRIBUTE_BUFFER + name)[rows]
            vectors = vectors + self.tables[name](attribute)
        return vectors

    def _load_from_state_dict(
        self,
        state_dict: Mapping[str, torch.Tensor],
        prefix: str,
        *args: object,
    ) -> None:
        # A checkpoint of a bank with item attributes: take its maps' buffers first, so they
        # load as expected keys (their values come with the rest of the state).
        for key, value in state_dict.items():
            name = key[len(prefix) :]
            if key.startswith(prefix) and name.startswith(ATTRIBUTE_BUFFER):
                name = name[len(ATTRIBUTE_BUFFER) :]
                if name in self.tables and name not in self.item_attributes:
                    self._attribute(name, torch.zeros_like(value))
        super()._load_from_state_dict(state_dict, prefix, *args)  # type: ignore[arg-type]

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
        index = self.clamp(name, index) if self.range_guard else index
        vectors = self.tables[name](index)
        if name == self.item_feature:
            vectors = self.with_attributes(index, vectors)
        return vectors

    def clamp(self, name: str, index: torch.Tensor) -> torch.Tensor:
        """`index` with what the table cannot hold read as OOV."""
        size = self.tables[name].num_embeddings
        return torch.where((index < 0) | (index >= size), torch.full_like(index, OOV), index)

    def forward(self, batch: Batch, names: list[str]) -> torch.Tensor:
        """`[B, len(names), dim]`: the embeddings of the named features, in that order."""
        if not names:
            return self.no_features(batch)
        return torch.stack([self.lookup(n, self.column(batch, n)) for n in names], dim=1)

    def column(self, batch: Batch, name: str) -> torch.Tensor:
        """A feature column as this bank reads it: padding on the rows `read_by` leaves out."""
        if self.feature_readers is None:
            return batch[name]
        entity = batch["entity_index"]
        reads = torch.isin(entity, entity.new_tensor(self.feature_readers))
        return torch.where(reads, batch[name], torch.full_like(batch[name], PAD))

    def read_by(self, entity_indices: list[int]) -> None:
        """Only rows of these entities read this bank's feature columns; on the others they
        embed to zeros and pass no gradient (nor count for the L2): a table of an entity's own
        part of a vector another table shares."""
        self.feature_readers = tuple(entity_indices)

    def no_features(self, batch: Batch) -> torch.Tensor:
        rows = batch["entity_index"].shape[0]
        return batch["entity_index"].new_zeros((rows, 0, self.dim), dtype=torch.float32)

    def cells(self, batch: Batch) -> dict[str, list[tuple[str, torch.Tensor]]]:
        """Per table, the columns of `batch` it serves with their cells (flat): its feature
        column, and for the item table every real slot of every sequence."""
        cells: dict[str, list[tuple[str, torch.Tensor]]] = {}
        for name in self.tables:
            parts = [(name, self.column(batch, name).reshape(-1))] if name in batch else []
            if name == self.item_feature:
                parts += [(s, batch[s][self.sequence_mask(batch, s)]) for s in self.length_columns]
            if parts:
                cells[name] = parts
        return cells

    def gather(self, batch: Batch) -> BatchEmbeddings:
        """Every column of `batch` this bank's tables serve, one lookup of distinct rows per
        table (module docstring). Kept for `l2_penalty` of the same batch when the L2 is on."""
        columns, sequences, tables = {}, {}, {}
        for name, parts in self.cells(batch).items():
            index = self.clamp(name, torch.cat([c for _, c in parts]))
            rows, inverse = torch.unique(index, return_inverse=True)
            vectors = self.tables[name](rows)  # [m, dim]: the table's only lookup this step
            tables[name] = (rows, vectors)
            if name == self.item_feature:
                vectors = self.with_attributes(rows, vectors)
            for (column, _), where in zip(
                parts, inverse.split([len(c) for _, c in parts]), strict=True
            ):
                if column == name:
                    columns[name] = vectors[where]
                else:
                    real_rows = self.sequence_mask(batch, column).nonzero(as_tuple=True)[0]
                    sequences[column] = (vectors[where], real_rows)
        looked_up = BatchEmbeddings(self.no_features(batch), columns, sequences, tables)
        trainable = [v for _, v in tables.values() if v.requires_grad]
        self.last_gathered = (batch, looked_up) if self.touch_counts and trainable else None
        if self.last_gathered is not None:
            # A backward frees the lookup's graph: an L2 after it must look the rows up again.
            trainable[0].register_hook(self.release_gathered)
        return looked_up

    def release_gathered(self, grad: torch.Tensor) -> None:
        self.last_gathered = None

    def sequence(self, batch: Batch, seq_name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A behaviour sequence through the shared item table: `[B, L, dim]` and the mask of
        real slots `[B, L]` (from the sequence's length column)."""
        if seq_name not in self.length_columns:
            raise KeyError(f"{seq_name!r} is not a sequence of the schema")
        items = batch[seq_name]
        return self.lookup(self.item_feature, items), self.sequence_mask(batch, seq_name)

    def sequence_mask(self, batch: Batch, seq_name: str) -> torch.Tensor:
        """`[B, L]`: the real slots of the sequence, on the rows that read it."""
        items = batch[seq_name]
        length = batch[self.length_columns[seq_name]]
        readers = self.sequence_readers.get(seq_name)
        if readers is not None:
            entity = batch["entity_index"]
            length = torch.where(torch.isin(entity, entity.new_tensor(readers)), length, 0)
        positions = torch.arange(items.shape[1], device=items.device)
        return positions.unsqueeze(0) < length.unsqueeze(1)

    def read_sequences(self, seq_name: str, entity_indices: list[int]) -> None:
        """Only rows of these entities read the sequence: on the others it is empty, so it
        neither informs their prediction nor passes their gradient to its items' rows."""
        if seq_name not in self.length_columns:
            raise KeyError(f"{seq_name!r} is not a sequence of the schema")
        self.sequence_readers[seq_name] = tuple(entity_indices)

    def touched_rows(self, batch: Batch) -> dict[str, torch.Tensor]:
        """Per table, the distinct rows this batch reads (`cells`), padding left out: it has
        no gradient."""
        touched: dict[str, torch.Tensor] = {}
        for name, parts in self.cells(batch).items():
            rows = torch.unique(self.clamp(name, torch.cat([c for _, c in parts])))
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
        without reading the rows a batch does not touch. Frozen tables are left out.

        After a training forward's `gather` of this same batch, its vectors are reused (and
        released): each table then has one lookup, and one gradient entry per row, a step."""
        gathered, self.last_gathered = self.last_gathered, None
        if gathered is not None and gathered[0] is batch:
            read = {}
            for name, (rows, vectors) in gathered[1].tables.items():
                real = rows != PAD
                read[name] = (rows[real], vectors[real])
        else:
            # Looked up like a feature, not indexed: a sparse table keeps a sparse gradient.
            read = {}
            for name, rows in self.touched_rows(batch).items():
                table = self.tables[name]
                read[name] = (rows, F.embedding(rows, table.weight, sparse=table.sparse))
        total = torch.zeros((), device=next(self.parameters()).device)
        for name, (rows, weights) in read.items():
            if not self.tables[name].weight.requires_grad:
                continue
            if name not in self.touch_counts:
                raise RuntimeError(
                    f"EmbeddingBank.l2_penalty: no touch counts for {name!r}; run count_rows "
                    "over the training batches first"
                )
            touches = self.touch_counts[name][rows].clamp(min=1.0)
            total = total + (weights.pow(2).sum(1) / touches).sum()
        return total

    def subset(self, names: list[str]) -> EmbeddingBank:
        """A bank holding only the named tables, sharing their parameters with this one
        (e.g. a serving graph without the other entity's specific features)."""
        missing = [n for n in names if n not in self.tables]
        if missing:
            raise KeyError(f"EmbeddingBank.subset: no tables for {missing}")
        # An item's vector keeps its attributes: their tables come with the item table.
        attributes = self.item_attributes if self.item_feature in names else []
        names = list(dict.fromkeys([*names, *attributes]))
        bank = EmbeddingBank.__new__(EmbeddingBank)
        nn.Module.__init__(bank)
        bank.dim = self.dim
        bank.item_feature = self.item_feature
        bank.length_columns = dict(self.length_columns)
        # A subset serves one entity's rows (a target path, a serving graph): every row reads
        # every sequence, with no dependence on `entity_index`.
        bank.sequence_readers = {}
        bank.feature_readers = None
        bank.tables = nn.ModuleDict({n: self.tables[n] for n in names})
        bank.touch_counts = self.touch_counts
        bank.range_guard = self.range_guard
        bank.last_gathered = None
        bank.item_attributes = []
        for name in attributes:
            bank._attribute(name, getattr(self, ATTRIBUTE_BUFFER + name))
        return bank
