"""Phase 4 of the ETL (etl/build_samples.py): vocabularies and bucket boundaries, from the
train split only.

Apart because only train rows may shape the indices: nothing of the valid and test rows leaks
into them. A bucket's vocab count is the train rows whose number falls in it, by the rule the
encoding applies (etl/samples_pass.py: 3 + the boundaries <= the value).
"""

from __future__ import annotations

from dataclasses import dataclass

from pyspark.sql import Column, DataFrame, Row, SparkSession, Window
from pyspark.sql import functions as F

from etl.config import DataConfig, Feature
from etl.encode import _bucket
from etl.raw_lines import _local_frame, _raw
from etl.split_pass import TRAIN_COUNT, TRAIN_VALUES
from mkt.contract import FIRST_INDEX


def _train_counts(
    groups: DataFrame, boundaries: dict[str, list[float]], config: DataConfig
) -> DataFrame:
    """(feature, entity, value, count) over the train split: every categorical raw value
    (`entity` null except for per-entity id spaces) and every bucket index (as text) of a
    bucketized feature's numbers.

    The split pass counted the categorical values per group under numeric keys (the
    feature's and entity's ordinals, and the value itself when it is a number); here the
    groups' counts are summed with the train rows' buckets, in one aggregation. Names and the
    values' text are attached once per distinct value.
    """
    names = [f.name for f in config.features]
    categorical = groups.where(F.col("kind") == TRAIN_COUNT).select(
        "f", "e", "number", "text", "count"
    )
    entry = F.struct(F.lit(None).cast("int").alias("f"), F.lit(None).cast("long").alias("number"))
    buckets = (
        groups.where(F.col("kind") == TRAIN_VALUES)
        .select(
            F.explode(
                F.array(
                    *[
                        F.when(
                            F.col(_raw(f)).isNotNull(),
                            F.struct(
                                F.lit(names.index(f.name)).alias("f"),
                                _bucket(boundaries[f.name], F.col(_raw(f))).alias("number"),
                            ),
                        ).otherwise(entry)
                        for f in _bucketized(config)
                    ]
                    or [entry]
                )
            ).alias("entry")
        )
        .where(F.col("entry.f").isNotNull())
        .select(
            "entry.f",
            F.lit(None).cast("int").alias("e"),
            "entry.number",
            F.lit(None).cast("string").alias("text"),
            F.lit(1).cast("long").alias("count"),
        )
    )
    counted = (
        categorical.unionByName(buckets)
        .groupBy("f", "e", "number", "text")
        # Not null, as a count: the vocab table's schema says so.
        .agg(F.coalesce(F.sum("count"), F.lit(0)).alias("count"))
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


def _bucket_boundaries(
    groups: DataFrame, config: DataConfig, *also: Column
) -> tuple[dict[str, list[float]], Row]:
    """Distinct train quantiles at 1/B, ..., (B-1)/B of every bucketized feature, from the
    split pass's train values (the only rows where those columns are set), in one job that
    also computes the aggregates `also` (the caller's, in the same row).

    Bucket i (0-based) holds boundaries[i-1] <= value < boundaries[i]; index = 3 + i. A
    quantile equal to the train minimum is dropped: it would open an always-empty first bucket.
    """
    features = _bucketized(config)
    aggregates = []
    for f in features:
        value = F.col(_raw(f)).try_cast("double")
        probabilities = [i / f.buckets for i in range(1, f.buckets)]
        aggregates += [
            F.percentile_approx(value, probabilities, config.quantile_accuracy).alias(f.name),
            F.min(value).alias(f"min__{f.name}"),
        ]
    row = groups.agg(*aggregates, *also).first()
    boundaries = {
        f.name: sorted({float(q) for q in row[f.name] or [] if q > row[f"min__{f.name}"]})
        for f in features
    }
    return boundaries, row


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
