"""Phase 4 of the ETL (etl/build_samples.py): vocabularies and bucket boundaries, from the
train split only.

Apart because only train rows may shape the indices: nothing of the valid and test rows leaks
into them. Buckets are counted with the encoding's own bucket code (etl/encode.py), so a
bucket's vocab count is exactly the train rows encoded with its index.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import reduce

from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F
from pyspark.sql.types import LongType

from etl.config import DataConfig, Feature
from etl.encode import _bucket_code, _number, _with_numbers
from etl.raw_lines import _local_frame, _raw
from mkt.contract import FIRST_INDEX


def _train_counts(
    train: DataFrame, boundaries: dict[str, list[float]], config: DataConfig
) -> DataFrame:
    """(feature, entity, value, count) over the train split, in one pass: every categorical
    raw value (`entity` null except for per-entity id spaces) and every bucketized feature's
    index (as text).

    Counted under numeric keys (the feature's and entity's ordinals, and the value itself when
    it is a number: integer ids and bucket indices), named and turned into text only once per
    distinct value: hashing and comparing the names and the ids' text on every train row cost
    more than the counting.
    """
    names = [f.name for f in config.features]
    numeric = {
        f.name
        for f in config.features
        if f.kind == "bucketized" or isinstance(train.schema[_raw(f)].dataType, LongType)
    }
    entries = {}
    for entity in config.entity_names:
        items = []
        for f in config.features_of(entity):
            if f.kind == "categorical":
                value = F.col(_raw(f))
            else:
                value = _bucket_code(f, boundaries[f.name], F.col(_number(f)))
            scope = config.entity_names.index(entity) if f.per_entity_ids else None
            items.append(
                F.struct(
                    F.lit(names.index(f.name)).alias("f"),
                    F.lit(scope).cast("int").alias("e"),
                    (value if f.name in numeric else F.lit(None)).cast("long").alias("number"),
                    (F.lit(None) if f.name in numeric else value).cast("string").alias("text"),
                )
            )
        entries[entity] = F.array(*items)
    per_row = reduce(
        lambda chosen, e: chosen.when(F.col("entity") == e, entries[e]),
        config.entity_names[1:],
        F.when(F.col("entity") == config.entity_names[0], entries[config.entity_names[0]]),
    )
    counted = (
        _with_numbers(train, _bucketized(config))
        .select(F.explode(per_row).alias("e"))
        .select("e.*")
        .where(F.col("number").isNotNull() | F.col("text").isNotNull())
        .groupBy("f", "e", "number", "text")
        .agg(F.count(F.lit(1)).alias("count"))
    )
    return counted.select(
        F.get(F.array(*[F.lit(n) for n in names]), F.col("f")).alias("feature"),
        F.get(F.array(*[F.lit(e) for e in config.entity_names]), F.col("e")).alias("entity"),
        F.coalesce(F.col("text"), F.col("number").cast("string")).alias("value"),
        "count",
    )


def _min_count(config: DataConfig) -> Column:
    """Each categorical feature's `min_count`, by the `feature` column of the counts."""
    pairs = [
        (F.lit(f.name), F.lit(f.min_count)) for f in config.features if f.kind == "categorical"
    ]
    return F.create_map(*(c for pair in pairs for c in pair))[F.col("feature")]


def _categorical_vocab(counts: DataFrame, config: DataConfig) -> DataFrame:
    """(feature, entity, raw_value, index, count) from the train counts.

    Index 3.. by descending train count, then entity, then raw value. `entity` is null except
    for per-entity id spaces (Tenrec's item_id), where one vocabulary holds (entity, value).
    A value on fewer train rows than its feature's `min_count` gets no index: it is OOV, in
    train rows as in valid, test and serving, so the OOV row learns what an id seen too rarely
    to have an embedding of its own looks like (docs/etl.md, "Rare ids").
    """
    features = [f.name for f in config.features if f.kind == "categorical"]
    order = Window.partitionBy("feature").orderBy(
        F.desc("count"), F.asc_nulls_first("entity"), "value"
    )
    return (
        counts.where(F.col("feature").isin(*features) & (F.col("count") >= _min_count(config)))
        # One task per feature at most: the numbering sorts each feature's values in one task.
        .repartition(max(1, len(features)), "feature")
        .select(
            "feature",
            "entity",
            F.col("value").alias("raw_value"),
            (F.row_number().over(order) + (FIRST_INDEX - 1)).cast("long").alias("index"),
            "count",
        )
    )


@dataclass(frozen=True)
class CountSummary:
    """What the driver needs of the train counts, from one job (:func:`_count_summary`)."""

    # Embedding rows per categorical feature with an index for some value (its largest
    # index + 1), for the encoding's join plan and the schema.
    sizes: dict[str, int]
    # Train rows per (bucketized feature, bucket index), for the bucket vocabulary.
    per_bucket: dict[tuple[str, int], int]
    # Per categorical feature with `min_count` > 1, for the job's summary: its threshold, and
    # the distinct train values and train rows below it (folded into OOV).
    rare_ids: dict[str, dict[str, int]]


def _count_summary(counts: DataFrame, config: DataConfig) -> CountSummary:
    """One small aggregation of the train counts: a row per bucket of every bucketized
    feature, and a row per categorical feature with its values above and below `min_count`
    (the categorical vocabulary indexes exactly those above, FIRST_INDEX.. in order)."""
    bucketized = F.col("feature").isin(*(f.name for f in _bucketized(config)))
    below = F.col("count") < _min_count(config)
    rows = (
        counts.groupBy("feature", F.when(bucketized, F.col("value")).alias("bucket"))
        .agg(
            F.sum("count").alias("rows"),
            F.count(F.when(~below, 1)).alias("indexed"),
            F.count(F.when(below, 1)).alias("oov_values"),
            F.sum(F.when(below, F.col("count"))).alias("oov_rows"),
        )
        .collect()
    )
    categorical = {r.feature: r for r in rows if r.bucket is None}
    return CountSummary(
        sizes={name: FIRST_INDEX + r.indexed for name, r in categorical.items() if r.indexed},
        per_bucket={(r.feature, int(r.bucket)): r.rows for r in rows if r.bucket is not None},
        rare_ids={
            f.name: {
                "min_count": f.min_count,
                "oov_values": categorical[f.name].oov_values if f.name in categorical else 0,
                "oov_train_rows": (categorical[f.name].oov_rows or 0)
                if f.name in categorical
                else 0,
            }
            for f in config.features
            if f.kind == "categorical" and f.min_count > 1
        },
    )


def _bucketized(config: DataConfig) -> list[Feature]:
    return [f for f in config.features if f.kind == "bucketized"]


def _bucket_boundaries(train: DataFrame, config: DataConfig) -> dict[str, list[float]]:
    """Distinct train quantiles at 1/B, ..., (B-1)/B of every bucketized feature (one job).

    Bucket i (0-based) holds boundaries[i-1] <= value < boundaries[i]; index = 3 + i. A
    quantile equal to the train minimum is dropped: it would open an always-empty first bucket.
    """
    features = _bucketized(config)
    if not features:
        return {}
    aggregates = []
    for f in features:
        value = F.col(_raw(f)).try_cast("double")
        probabilities = [i / f.buckets for i in range(1, f.buckets)]
        aggregates += [
            F.percentile_approx(value, probabilities, config.quantile_accuracy).alias(f.name),
            F.min(value).alias(f"min__{f.name}"),
        ]
    row = train.agg(*aggregates).first()
    return {
        f.name: sorted({float(q) for q in row[f.name] or [] if q > row[f"min__{f.name}"]})
        for f in features
    }


def _bucket_vocab(
    spark: SparkSession,
    per_bucket: dict[tuple[str, int], int],
    boundaries: dict[str, list[float]],
    config: DataConfig,
) -> DataFrame:
    """One vocab row per bucket: raw_value = the bucket's lower bound, count = train rows."""
    rows = []
    for f in _bucketized(config):
        for i, lower in enumerate([float("-inf"), *boundaries[f.name]]):
            index = FIRST_INDEX + i
            rows.append((f.name, None, repr(lower), index, per_bucket.get((f.name, index), 0)))
    return _local_frame(
        spark, rows, "feature string, entity string, raw_value string, index long, count long"
    )
