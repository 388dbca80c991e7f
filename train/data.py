"""The `samples` Delta table as Ray Data streams, and the step from Ray batches to model batches.

Shuffling (docs/training.md, "Shuffling"), without materialising the table:
- each entity's train rows are a stream of their own, read in a new random file order every
  epoch (`FileShuffleConfig`, reseeded per execution);
- each worker draws an entity's batches from a local buffer of `train.shuffle_buffer_rows`
  rows, which mixes users (the ETL writes a user's rows into one file);
- a training batch takes from every entity's stream a share proportional to that entity's
  rows (`mixed_batches`), so every MEM step sees source and target rows in the proportion of
  the whole table. One stream of both entities would instead hand out long single-entity
  runs, because files hold one entity each and are read one after another.
A global `random_shuffle()` would move the whole table through the object store every epoch,
which SGD on click logs does not need. A stage small enough to cache (train.stage,
`train.cache_max_rows`) replays its streams' blocks from the object store, in a new block order
every epoch.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pds
import ray.data
import torch
from deltalake import DeltaTable
from ray.data import FileShuffleConfig
from ray.data.collate_fn import ArrowBatchCollateFn
from ray.data.expressions import Expr, col

from mkt.features import Batch, to_tensors
from mkt.item_attributes import attribute_features, item_attribute_maps
from mkt.schema import FeatureSchema, samples_table


class DataError(ValueError):
    """Samples that cannot feed a stage."""


def stage_entities(schema: FeatureSchema, rows: str) -> list[str]:
    """A stage's `entities` ("both", "target", "source") as entity names."""
    choices = {
        "both": list(schema.entities),
        "target": [schema.target_entity],
        "source": [schema.source_entity],
    }
    if rows not in choices:
        raise DataError(f"stage rows {rows!r} is not one of {sorted(choices)}")
    return choices[rows]


def model_columns(schema: FeatureSchema) -> list[str]:
    """The columns `to_tensors` reads."""
    names = [*schema.index_columns, *(f.name for f in schema.sequences)]
    return [*names, schema.columns["entity"], schema.columns["label"]]


def read_samples(
    out_dir: str | Path,
    schema: FeatureSchema,
    entities: Iterable[str],
    split: str,
    columns: Iterable[str],
    shuffle_seed: int | None = None,
    read_tasks: int | None = None,
    rows: Expr | None = None,
) -> ray.data.Dataset:
    """`columns` of the rows of `entities` in `split` (and `rows`, a further filter),
    streamed, by at most `read_tasks` read tasks at a time (None: as many as Ray Data likes).
    The entity and split filter is on the partition columns, so Ray pushes it into the read
    and files of other partitions are never opened."""
    entity_col, split_col = schema.columns["entity"], schema.columns["split"]
    shuffle = FileShuffleConfig(seed=shuffle_seed) if shuffle_seed is not None else None
    extra = [schema.columns["line_no"]] if rows is not None else []
    ds = ray.data.read_delta(
        str(samples_table(out_dir)),
        columns=list(dict.fromkeys([*columns, *extra, entity_col, split_col])),
        shuffle=shuffle,
        concurrency=read_tasks,
    )
    wanted = col(entity_col).is_in(list(entities)) & (col(split_col) == split)
    return ds.filter(expr=wanted if rows is None else wanted & rows)


# Multiplier of a line number's hash: consecutive lines (a user's rows) land far apart.
_HOLDOUT_HASH = 2654435761
_HOLDOUT_BUCKETS = 10000


def holdout_bucket(line_no: Any) -> Any:
    """`(line_no * _HOLDOUT_HASH) % _HOLDOUT_BUCKETS`, for a column expression or an integer,
    computed as `((line_no % B) * (_HOLDOUT_HASH % B)) % B` (the same value): Ray evaluates
    the expression through float64 somewhere, and the product itself passes 2^53 from line
    3.4M on (it failed a 22M-row run)."""
    return ((line_no % _HOLDOUT_BUCKETS) * (_HOLDOUT_HASH % _HOLDOUT_BUCKETS)) % _HOLDOUT_BUCKETS


def target_rows_filter(schema: FeatureSchema, part: str, share: float) -> Expr | None:
    """The filter of a stage's target train rows (mkt.pipelines.Stage.target_rows): a row is
    held out when a hash of its line number falls in the first `share` of the buckets, so the
    two parts are the same whatever reads them, and interleave users and time."""
    if part == "all" or share <= 0:
        return None
    bucket = holdout_bucket(col(schema.columns["line_no"]))
    held_out = bucket < round(share * _HOLDOUT_BUCKETS)
    if part == "holdout":
        return held_out
    if part == "pretrain":
        return bucket >= round(share * _HOLDOUT_BUCKETS)
    raise DataError(f"target rows {part!r} is not one of all, pretrain, holdout")


def stage_target_share(part: str, share: float) -> float:
    """The expected share of the target train rows a stage reads."""
    if part == "all" or share <= 0:
        return 1.0
    return share if part == "holdout" else 1.0 - share


def entity_rows(out_dir: str | Path, schema: FeatureSchema, entity: str, split: str) -> int:
    """Rows of one entity in one split: from the schema file's counts, else counted."""
    known = schema.counts.get(entity, {}).get(split)
    if known is not None:
        return int(known)
    return read_samples(out_dir, schema, [entity], split, [schema.columns["line_no"]]).count()


def train_item_attributes(out_dir: str | Path, schema: FeatureSchema) -> dict[str, torch.Tensor]:
    """`mkt.item_attributes.item_attribute_maps` of the samples' train rows, read in Arrow
    batches of the item and attribute columns alone (memory: the distinct pairs)."""
    names = [schema.item_feature, *attribute_features(schema)]
    dataset = DeltaTable(str(samples_table(out_dir))).to_pyarrow_dataset()
    batches = dataset.to_batches(
        columns=names, filter=pds.field(schema.columns["split"]) == "train"
    )
    return item_attribute_maps(
        ({n: b.column(n).to_numpy(zero_copy_only=False) for n in names} for b in batches), schema
    )


def train_dataset_name(entity: str) -> str:
    return f"train_{entity}"


def entity_batch_sizes(rows: Mapping[str, int], batch_size: int) -> dict[str, int]:
    """Each entity's share of a training batch, proportional to its rows (at least one row);
    entities without rows get none."""
    total = sum(rows.values())
    if total == 0:
        raise DataError(f"no training rows for entities {sorted(rows)}")
    return {e: max(1, round(batch_size * n / total)) for e, n in rows.items() if n > 0}


def mixed_batches(streams: Iterable[Iterable[Batch]]) -> Iterator[Batch]:
    """One batch from every stream per step, concatenated row-wise. With batch sizes from
    `entity_batch_sizes` the streams run out together; the last steps take what is left."""
    active = [iter(stream) for stream in streams]
    while active:
        parts = []
        for stream in list(active):
            try:
                parts.append(next(stream))
            except StopIteration:
                active.remove(stream)
        if len(parts) == 1:
            yield parts[0]
        elif parts:
            yield {name: torch.cat([p[name] for p in parts]) for name in parts[0]}


class ModelBatches(ArrowBatchCollateFn):
    """Collate for `iter_torch_batches`: a Ray batch as an Arrow table -> `mkt.features.to_tensors`,
    plus the untouched `keep` columns (e.g. `user_key` for GAUC) as tensors. Arrow, not numpy:
    Ray hands a list column to numpy as one array per row, and stacking them was the largest
    cost of a batch; the flat values of a padded list column are already the matrix."""

    def __init__(self, schema: FeatureSchema, keep: Iterable[str] = ()) -> None:
        self.schema = schema
        self.keep = tuple(keep)
        self.entities = pa.array(schema.entities)

    def __call__(self, batch: pa.Table) -> Batch:
        columns: dict[str, Any] = {}
        for name in batch.column_names:
            values = batch[name].combine_chunks()
            if pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
                # Padded to seq_len by the ETL; to_tensors checks the width.
                flat = values.flatten().to_numpy(zero_copy_only=False)
                columns[name] = flat.reshape(len(values), -1) if len(values) else flat
            elif name == self.schema.columns["entity"] and pa.types.is_string(values.type):
                index = pc.index_in(values, value_set=self.entities)
                if index.null_count:
                    unknown = pc.filter(values, pc.is_null(index))[0].as_py()
                    raise ValueError(
                        f"unknown entity {unknown!r}; schema has {self.schema.entities}"
                    )
                columns[name] = index.to_numpy()
            else:
                columns[name] = values.to_numpy(zero_copy_only=False)
        # Arrow's buffers are read-only; a tensor must own memory the step may write.
        columns = {k: v if v.flags.writeable else v.copy() for k, v in columns.items()}
        out = to_tensors(self.schema, columns)
        for name in self.keep:
            out[name] = torch.as_tensor(np.asarray(columns[name]))
        return out
