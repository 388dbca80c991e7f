"""A small in-memory schema and learnable batches, for tests, examples and the in-memory
throughput ceiling of the benchmarks. Real data comes from `etl/build_samples.py`."""

from __future__ import annotations

import numpy as np

from mkt.features import Batch, to_tensors
from mkt.schema import FeatureSchema

_SEQ_LEN = 8


def toy_schema(
    seq_len: int = _SEQ_LEN,
    n_users: int = 200,
    n_items: int = 300,
    source: str = "product",
    target: str = "post",
    like_rates: dict[str, float] | None = None,
) -> FeatureSchema:
    """Two entities with different specific features (the paper's product/post example).
    `like_rates` (entity -> train like rate) records counts and likes, as the ETL does."""
    reserved = 3
    features = [
        {
            "name": "user_id",
            "group": "user",
            "kind": "categorical",
            "vocab_size": n_users + reserved,
        },
        {"name": "gender", "group": "user", "kind": "categorical", "vocab_size": 3 + reserved},
        {
            "name": "item_id",
            "group": "shared",
            "kind": "categorical",
            "vocab_size": n_items + reserved,
        },
        {"name": "catalog", "group": "shared", "kind": "categorical", "vocab_size": 10 + reserved},
        {
            "name": "price",
            "group": "specific",
            "entity": source,
            "kind": "bucketized",
            "vocab_size": 8 + reserved,
        },
        {
            "name": "brand",
            "group": "specific",
            "entity": source,
            "kind": "categorical",
            "vocab_size": 20 + reserved,
        },
        {
            "name": "content_style",
            "group": "specific",
            "entity": target,
            "kind": "categorical",
            "vocab_size": 6 + reserved,
        },
        {
            "name": "quality",
            "group": "specific",
            "entity": target,
            "kind": "bucketized",
            "vocab_size": 5 + reserved,
        },
        {
            "name": "noise",
            "group": "specific",
            "entity": target,
            "kind": "categorical",
            "vocab_size": 7 + reserved,
        },
    ]
    for e in (source, target):
        features.append(
            {
                "name": f"seq_{e}",
                "group": "sequence",
                "entity": e,
                "kind": "sequence",
                "item_feature": "item_id",
                "seq_len": seq_len,
                "length_column": f"seq_{e}_len",
            }
        )
    return FeatureSchema.from_dict(
        {
            "format_version": 1,
            "dataset": "toy",
            "source_entity": source,
            "target_entity": target,
            "entities": [source, target],
            "seq_len": seq_len,
            "history_mode": "frozen",
            "item_feature": "item_id",
            "features": features,
            "columns": {
                "entity": "entity",
                "split": "split",
                "line_no": "line_no",
                "user_key": "user_key",
                "label": "label",
            },
            "counts": {e: {"train": 10000} for e in (like_rates or {})},
            "likes": {e: {"train": round(10000 * r)} for e, r in (like_rates or {}).items()},
        }
    )


def toy_columns(
    schema: FeatureSchema, n: int, seed: int = 0, target_share: float = 0.3
) -> dict[str, np.ndarray]:
    """Columns as the samples table holds them, with a planted signal: a user-item affinity
    shared by both entities, one informative specific feature per entity, and a sequence
    that contains the candidate item more often when the label is 1."""
    rng = np.random.default_rng(seed)
    user_vocab = schema.feature("user_id").vocab_size
    item_vocab = schema.feature(schema.item_feature).vocab_size
    user = rng.integers(3, user_vocab, n)
    item = rng.integers(3, item_vocab, n)
    is_target = rng.random(n) < target_share
    entity_index = np.where(is_target, schema.target_index, schema.source_index)
    # Shared latent affinity: same for both entities, so knowledge transfers.
    u_vec = np.random.default_rng(1).normal(size=(user_vocab, 4))
    i_vec = np.random.default_rng(2).normal(size=(item_vocab, 4))
    affinity = (u_vec[user] * i_vec[item]).sum(1)
    cols: dict[str, np.ndarray] = {"user_id": user, schema.item_feature: item}
    for f in schema.features:
        if f.group in ("user", "shared") and f.name not in cols:
            cols[f.name] = rng.integers(3, f.vocab_size, n)
    logit = 1.5 * affinity - 1.0
    for e_i, entity in enumerate(schema.entities):
        rows = entity_index == e_i
        for j, f in enumerate(schema.specific_features(entity)):
            values = rng.integers(3, f.vocab_size, n)
            cols[f.name] = np.where(rows, values, 0)
            if j == 0:  # the first specific feature of each entity is informative
                logit = logit + np.where(rows, (values - values.mean()) * 0.6, 0.0)
    label = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    for f in schema.sequences:
        seq = rng.integers(3, item_vocab, (n, f.seq_len))
        length = rng.integers(0, f.seq_len + 1, n)
        # Positives saw the candidate (or its neighbour) recently.
        seq[:, 0] = np.where(label == 1, item, seq[:, 0])
        length = np.where(label == 1, np.maximum(length, 1), length)
        seq[np.arange(f.seq_len)[None, :] >= length[:, None]] = 0
        cols[f.name] = seq
        cols[f.length_column] = length
    cols["entity"] = np.array(schema.entities, dtype=object)[entity_index]
    cols["label"] = label
    cols["user_key"] = user
    cols["line_no"] = np.arange(1, n + 1)
    return cols


def toy_batch(schema: FeatureSchema, n: int, seed: int = 0, target_share: float = 0.3) -> Batch:
    return to_tensors(schema, toy_columns(schema, n, seed, target_share))
