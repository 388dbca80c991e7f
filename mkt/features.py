"""Columns of the samples table -> the tensor batch every model in `mkt` consumes.

A batch is a `dict[str, Tensor]`:
- each user / shared / specific feature by name: int64 `[B]` (index into its vocabulary);
- each sequence by name (`seq_<entity>`): int64 `[B, seq_len]`, and its length column `[B]`;
- `entity_index`: int64 `[B]`, position of the row's entity in `schema.entities`;
- `label`: float32 `[B]` when the columns carry labels.

Training, evaluation and serving all go through `to_tensors`, so the encoding cannot drift.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from mkt.schema import FeatureSchema

Batch = dict[str, torch.Tensor]


def _as_matrix(values: Any, seq_len: int, name: str) -> np.ndarray:
    """Sequence column -> int64 [B, seq_len]; Arrow lists may arrive as an object array."""
    arr = np.asarray(values)
    if arr.dtype == object:
        arr = np.stack([np.asarray(v, dtype=np.int64) for v in arr]) if len(arr) else arr
    arr = arr.astype(np.int64, copy=False).reshape(len(arr), -1) if len(arr) else arr
    if len(arr) and arr.shape[1] != seq_len:
        raise ValueError(f"column {name!r}: sequences of length {arr.shape[1]}, expected {seq_len}")
    return arr.reshape(-1, seq_len)


def to_tensors(
    schema: FeatureSchema,
    columns: Mapping[str, Any],
    device: torch.device | str = "cpu",
) -> Batch:
    """Convert a column mapping (numpy arrays, e.g. a Ray Data numpy batch) to a model batch."""
    missing = [c for c in [*schema.index_columns, schema.columns["entity"]] if c not in columns]
    missing += [f.name for f in schema.sequences if f.name not in columns]
    if missing:
        raise KeyError(f"batch lacks columns {missing}")
    batch: Batch = {}
    for name in schema.index_columns:
        batch[name] = torch.as_tensor(np.asarray(columns[name], dtype=np.int64))
    for f in schema.sequences:
        batch[f.name] = torch.as_tensor(_as_matrix(columns[f.name], f.seq_len, f.name))
    entity = np.asarray(columns[schema.columns["entity"]])
    if entity.dtype.kind in "iu":
        entity_index = entity.astype(np.int64)
    else:
        lookup = {name: i for i, name in enumerate(schema.entities)}
        try:
            entity_index = np.fromiter((lookup[str(e)] for e in entity), np.int64, len(entity))
        except KeyError as e:
            raise ValueError(f"unknown entity {e.args[0]!r}; schema has {schema.entities}") from e
    batch["entity_index"] = torch.as_tensor(entity_index)
    label_col = schema.columns["label"]
    if label_col in columns:
        batch["label"] = torch.as_tensor(np.asarray(columns[label_col], dtype=np.float32))
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def select_rows(batch: Batch, mask: torch.Tensor) -> Batch:
    """The rows of a batch where `mask` is true (routing a mixed batch by entity)."""
    return {k: v[mask] for k, v in batch.items()}
