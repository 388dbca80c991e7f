"""Phase 5 of the ETL (etl/build_samples.py), as one Arrow pass per group of users: every
feature as its index, the liked-item sequences, each samples file's row order, and the files.

Each task reads the kept rows of one group of users (the shuffle's groups, which are the
samples files), ordered by (user, entity, line), as phase 3 staged them; the task encodes them
with the vocabulary files and the bucket boundaries, builds every row's sequences from one
array of the group's liked items, and writes one Parquet file per (entity, split) directly
under the table, returning only the files' names and row counts. The same rules as Spark's
joins, windows, sort and writer took 58 CPU s at 5M raw rows, this pass about 14
(docs/BENCHMARKS.md, "Stop 37"): each row's lists went through a window buffer and the whole
rows through a sort.

A user's history in one entity is a contiguous range of the group's liked items (rows in line
order, liked rows in the same order), so every list a row may need is [start, end) of that
array, newest first, cut to seq_len: the likes on earlier lines of the row's own entity end
at the likes before the row, a block's (train, train + valid) at the block's likes. The
contract's rules (docs/etl.md, "Sequences and history modes") become the choice of range.

Runs in Spark's Python workers and computes with numpy and pyarrow: no Spark API here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pyarrow import fs as pafs

from etl import spark_hash
from etl.config import DataConfig, Feature
from etl.raw_lines import _integer_id, _raw
from mkt.contract import (
    ACTIVITY_BOUNDARIES,
    ACTIVITY_COUNTS,
    ACTIVITY_RELATIONS,
    FIRST_INDEX,
    MISSING,
    OOV,
    PAD,
    SPLITS,
    activity_feature,
)

# Rows per Parquet row group at most (etl/storage.py says why).
ROW_GROUP_ROWS = 131_072
# Each bucketized feature comes as its parsed number, null when the raw value is missing or not
# a number; NOT_NUMBERS has bit i set where the i-th bucketized feature's value is not a number.
NOT_NUMBERS = "not_numbers"
GROUP = "group"  # the shuffle's partition: the group of users
# Fixes the pseudo-random order of the rows inside each samples file (file_order).
ROW_ORDER_SEED = 20240901


def staged_file(staging_uri: str, group: int) -> str:
    """Where phase 3 (etl/split_pass.py) leaves a group's kept rows for this pass."""
    return f"{staging_uri}/group-{group:05d}.arrow"


def _read_staged(staging_uri: str, group: int) -> pa.Table | None:
    """The group's staged rows; None for a group without rows (phase 3 staged no file)."""
    filesystem, path = pafs.FileSystem.from_uri(staged_file(staging_uri, group))
    if filesystem.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with filesystem.open_input_file(path) as source:
        return pa.ipc.open_file(source).read_all()


def number_column(feature: Feature) -> str:
    return f"number__{feature.name}"


def integer_column(feature: Feature) -> str:
    return f"integer__{feature.name}"


def text_features(config: DataConfig) -> list[Feature]:
    """The categorical features whose raw values are text (not integer ids)."""
    return [f for f in config.features if f.kind == "categorical" and not _integer_id(f, config)]


def categorical_values(rows: pa.Table, feature: Feature) -> pa.ChunkedArray:
    """A categorical feature's raw values: an integer id as it is; text as Spark handed it
    over, an integer's canonical text as the integer (integer_column), the rest as text,
    since Spark hands text over to Arrow at several times an integer's cost."""
    if integer_column(feature) not in rows.column_names:
        return rows.column(_raw(feature))
    integers = rows.column(integer_column(feature))
    return pc.if_else(
        integers.is_valid(), pc.cast(integers, pa.string()), rows.column(_raw(feature))
    )


def bucketized(config: DataConfig) -> list[Feature]:
    """The bucketized features, in the order of NOT_NUMBERS's bits."""
    return [f for f in config.features if f.kind == "bucketized"]


def file_order(user_key: np.ndarray, line_no: np.ndarray, config: DataConfig) -> np.ndarray:
    """Each row's place in its samples file: the top bits of Spark's
    xxhash64(ROW_ORDER_SEED, user_key, line_no), as many as the job's earlier sort key of the
    (entity, split) partitions left for it, so the files keep the row order they always had."""
    bits = 63 - (len(config.entity_names) * len(SPLITS)).bit_length()
    h = spark_hash.hash_int(ROW_ORDER_SEED, np.full(len(user_key), spark_hash.SEED))
    h = spark_hash.hash_long(line_no, spark_hash.hash_long(user_key, h))
    return (h >> np.uint64(64 - bits)).astype(np.int64)


@dataclass(frozen=True)
class SamplesPass:
    """What every task needs; pickled once into the job's closure."""

    config: DataConfig
    boundaries: dict[str, list[float]]
    vocab_files: tuple[str, ...]  # URIs of the vocab table's Parquet files of this run
    schema: pa.Schema  # the samples table's, partition columns included
    staging_uri: str  # where phase 3 staged each group's rows (staged_file)
    files_uri: str | None  # write under TABLE/run-<id>/ here; None: return the rows instead
    run_id: str

    def __call__(self, batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        """Each input row is a group's number: its staged rows in, its files (or rows) out."""
        for batch in batches:
            for group in batch.column(0).to_pylist():
                rows = _read_staged(self.staging_uri, group)
                if rows is None:
                    continue
                parts = self.encode(rows)
                if self.files_uri is None:
                    for _, table in parts:
                        yield from table.to_batches()
                    continue
                written = self.write(parts, group)
                yield pa.RecordBatch.from_pydict(
                    {"path": [p for p, _ in written], "rows": [n for _, n in written]},
                    schema=pa.schema([("path", pa.string()), ("rows", pa.int64())]),
                )

    def encode(self, rows: pa.Table) -> Iterator[tuple[tuple[str, str], pa.Table]]:
        """One table per (entity, split) partition, in its file's row order, one at a time:
        a worker holds one partition's rows at once, not the group's six."""
        config = self.config
        entities = config.entity_names
        n = rows.num_rows
        entity = rows.column("entity").to_numpy()
        split = rows.column("split").to_numpy()
        user_key = rows.column("user_key").to_numpy()
        label = rows.column("label").to_numpy(zero_copy_only=False)
        vocab = _vocab(self.vocab_files)

        indices = {f.name: self._feature(f, rows, entity, vocab) for f in config.features}

        # Blocks: one user's rows of one entity, contiguous and in line order.
        new_user = np.ones(n, bool)
        new_user[1:] = user_key[1:] != user_key[:-1]
        new_block = new_user.copy()
        new_block[1:] |= entity[1:] != entity[:-1]
        user = np.cumsum(new_user) - 1
        block = np.cumsum(new_block) - 1
        block_start = np.flatnonzero(new_block)
        liked = label == 1
        likes_before_row = np.cumsum(liked) - liked  # the group's likes on earlier rows
        items = indices[config.item_feature][liked]  # the group's liked items, in row order
        first_like = likes_before_row[block_start]  # per block: its first like in `items`
        in_block = np.arange(n) - block_start[block]

        def per_block(mask: np.ndarray) -> np.ndarray:
            return np.bincount(block, weights=mask, minlength=len(block_start)).astype(np.int64)

        train, fit = split == 0, split != 2
        blocks = {
            "train": (per_block(train), per_block(liked & train)),
            "fit": (per_block(fit), per_block(liked & fit)),
        }
        # Per (user, entity): its block, or -1.
        block_of = np.full((user[-1] + 1, len(entities)), -1, np.int64)
        block_of[user[block_start], entity[block_start]] = np.arange(len(block_start))

        def counts(relation: str, e: int | None = None) -> tuple[np.ndarray, np.ndarray]:
            """(rows, likes) of each row's history in its own entity or in entity e."""
            if relation == "own":
                before = (in_block, likes_before_row - first_like[block])
                if config.history_mode == "online":
                    return before
                rows_, likes = before
                for kind, chosen in (("train", split == 1), ("fit", split == 2)):
                    rows_ = np.where(chosen, blocks[kind][0][block], rows_)
                    likes = np.where(chosen, blocks[kind][1][block], likes)
                return rows_, likes
            other = block_of[user, e]
            kind_rows = np.where(split == 2, blocks["fit"][0][other], blocks["train"][0][other])
            kind_likes = np.where(split == 2, blocks["fit"][1][other], blocks["train"][1][other])
            present = other >= 0
            return np.where(present, kind_rows, 0), np.where(present, kind_likes, 0)

        sequences: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> _newest_first
        columns: dict[str, np.ndarray | pa.ChunkedArray] = {
            "line_no": rows.column("line_no"),
            "user_key": rows.column("user_key"),
            "label": rows.column("label"),
            **indices,
        }
        if config.activity:
            other_entity = 1 - entity if len(entities) == 2 else None
            for relation in ACTIVITY_RELATIONS:
                if relation == "own":
                    rows_, likes = counts("own")
                else:
                    rows_, likes = np.zeros(n, np.int64), np.zeros(n, np.int64)
                    for e in range(len(entities)):
                        chosen = other_entity == e
                        r, k = counts("other", e)
                        rows_, likes = np.where(chosen, r, rows_), np.where(chosen, k, likes)
                for count, value in zip(ACTIVITY_COUNTS, (rows_, likes), strict=True):
                    columns[activity_feature(count, relation)] = FIRST_INDEX + np.searchsorted(
                        np.asarray(ACTIVITY_BOUNDARIES), value, side="right"
                    )
        _, own_likes = counts("own")
        for e, name in enumerate(entities):
            _, other_likes = counts("other", e)
            own = entity == e
            start = np.where(own, first_like[block], first_like[np.maximum(block_of[user, e], 0)])
            length = np.where(own, own_likes, other_likes)
            sequences[f"seq_{name}"] = _newest_first(items, start, length, config.seq_len)
            columns[f"seq_{name}_len"] = np.minimum(length, config.seq_len)

        order = file_order(user_key, rows.column("line_no").to_numpy(), config)
        for e, name in enumerate(entities):
            for s, split_name in enumerate(SPLITS):
                chosen = np.flatnonzero((entity == e) & (split == s))
                if len(chosen) == 0:
                    continue
                chosen = chosen[np.argsort(order[chosen], kind="stable")]
                yield (name, split_name), self._table(columns, sequences, chosen, name, split_name)

    def _feature(
        self, f: Feature, rows: pa.Table, entity: np.ndarray, vocab: dict[str, pa.Table]
    ) -> np.ndarray:
        """Contract: 0 pad / not applicable, 1 missing, 2 OOV, 3.. the vocabulary's index."""
        entities = self.config.entity_names
        if f.kind == "bucketized":
            number = rows.column(number_column(f))
            values = number.to_numpy(zero_copy_only=False)
            index = FIRST_INDEX + np.searchsorted(
                np.asarray(self.boundaries[f.name], float), values, side="right"
            )
            bit = np.int64(1 << bucketized(self.config).index(f))
            not_number = (rows.column(NOT_NUMBERS).to_numpy() & bit) != 0
            missing = number.is_null().to_numpy(zero_copy_only=False) & ~not_number
            index = np.where(not_number, OOV, index)
        else:
            raw = categorical_values(rows, f)
            entries = vocab.get(f.name)
            index = np.full(len(entity), OOV, np.int64)
            if entries is not None:
                scopes = (
                    [(e, entity == i) for i, e in enumerate(entities)]
                    if f.per_entity_ids
                    else [(None, None)]
                )
                for scope, mask in scopes:
                    known = (
                        entries
                        if scope is None
                        else entries.filter(pc.equal(entries.column("entity"), scope))
                    )
                    if known.num_rows == 0:
                        continue
                    keys = known.column("raw_value").cast(raw.type)
                    position = pc.index_in(raw, value_set=keys)
                    found = position.is_valid().to_numpy(zero_copy_only=False)
                    if mask is not None:
                        found = found & mask
                    where = position.fill_null(0).to_numpy()
                    index = np.where(found, known.column("index").to_numpy()[where], index)
            missing = raw.is_null().to_numpy(zero_copy_only=False)
        index = np.where(missing, MISSING, index)
        applies = np.isin(entity, [entities.index(e) for e in f.columns])
        return np.where(applies, index, PAD).astype(np.int64)

    def _table(
        self,
        columns: dict[str, np.ndarray | pa.ChunkedArray],
        sequences: dict[str, tuple[np.ndarray, np.ndarray]],
        chosen: np.ndarray,
        entity: str,
        split: str,
    ) -> pa.Table:
        """The rows `chosen` of one (entity, split) partition; with the partition columns
        only when the rows go back to Spark (in a file they are the directory's name)."""
        schema = self.schema if self.files_uri is None else _without_partitions(self.schema)
        take = pa.array(chosen)
        arrays = []
        for field in schema:
            if field.name in ("entity", "split"):
                text = entity if field.name == "entity" else split
                arrays.append(pa.array(np.full(len(chosen), text, object), pa.string()))
            elif field.name in sequences:
                lists, row_list = sequences[field.name]
                matrix = lists[row_list[chosen]]
                offsets = np.arange(0, matrix.size + 1, matrix.shape[1], dtype=np.int32)
                arrays.append(pa.ListArray.from_arrays(offsets, matrix.ravel(), type=field.type))
            elif isinstance(columns[field.name], np.ndarray):
                arrays.append(pa.array(columns[field.name][chosen], field.type))
            else:
                arrays.append(columns[field.name].take(take).cast(field.type))
        return pa.Table.from_arrays(arrays, schema=schema)

    def write(
        self, parts: Iterator[tuple[tuple[str, str], pa.Table]], group: int
    ) -> list[tuple[str, int]]:
        """One Parquet file per (entity, split) under files_uri, as Spark would lay them out."""
        filesystem, root = pafs.FileSystem.from_uri(self.files_uri)
        # Spark's naming: the group (the task's partition) first, so that the table's files
        # list in the same order on every rebuild (etl/storage.py, _add_actions).
        name = f"part-{group:05d}-{self.run_id}.c000.snappy.parquet"
        written = []
        for (entity, split), table in parts:
            directory = f"{root}/entity={entity}/split={split}"
            filesystem.create_dir(directory, recursive=True)
            pq.write_table(
                table,
                f"{directory}/{name}",
                filesystem=filesystem,
                row_group_size=ROW_GROUP_ROWS,
                compression="snappy",
            )
            written.append((f"{self.files_uri}/entity={entity}/split={split}/{name}", len(table)))
        return written


def samples_schema(config: DataConfig) -> pa.Schema:
    """The samples table's columns (docs/data-contract.md), with the nullability that Spark's
    writer gave them, so the Delta schema is the one earlier versions of the job committed."""
    fields = [
        pa.field("entity", pa.string()),
        pa.field("split", pa.string(), nullable=False),
        pa.field("line_no", pa.int64()),
        pa.field("user_key", pa.int64()),
        pa.field("label", pa.int8()),
        *[pa.field(f.name, pa.int64(), nullable=f.kind == "bucketized") for f in config.features],
        *[
            pa.field(activity_feature(count, relation), pa.int64(), nullable=False)
            for relation in ACTIVITY_RELATIONS
            for count in ACTIVITY_COUNTS
            if config.activity
        ],
    ]
    for e in config.entity_names:
        fields += [
            pa.field(f"seq_{e}", pa.list_(pa.field("element", pa.int64())), nullable=False),
            pa.field(f"seq_{e}_len", pa.int64(), nullable=False),
        ]
    return pa.schema(fields)


def _newest_first(
    items: np.ndarray, start: np.ndarray, length: np.ndarray, seq_len: int
) -> tuple[np.ndarray, np.ndarray]:
    """The newest seq_len of items[start : start + length] of each row, newest first, padded
    with PAD, as (lists, row_list): row i's list is lists[row_list[i]]. Rows share lists (a
    user's rows until the next like, a block's frozen rows), so each distinct one is built
    once."""
    end = start + length
    kept = np.minimum(length, seq_len)
    distinct, row_list = np.unique(end * (seq_len + 1) + kept, return_inverse=True)
    end, kept = np.divmod(distinct, seq_len + 1)
    newest = np.arange(seq_len)
    position = np.clip(end[:, None] - 1 - newest, 0, max(len(items) - 1, 0))
    values = items[position] if len(items) else np.zeros(position.shape, np.int64)
    return np.where(newest < kept[:, None], values, PAD).astype(np.int64), row_list


def _without_partitions(schema: pa.Schema) -> pa.Schema:
    return pa.schema([f for f in schema if f.name not in ("entity", "split")])


@lru_cache(maxsize=2)
def _vocab(files: tuple[str, ...]) -> dict[str, pa.Table]:
    """The run's categorical vocabularies by feature, read once per Python worker."""
    if not files:
        return {}
    filesystem, _ = pafs.FileSystem.from_uri(files[0])
    paths = [pafs.FileSystem.from_uri(f)[1] for f in files]
    table = pq.read_table(
        paths, filesystem=filesystem, columns=["feature", "entity", "raw_value", "index"]
    )
    return {
        name: table.filter(pc.equal(table.column("feature"), name))
        for name in pc.unique(table.column("feature")).to_pylist()
    }
