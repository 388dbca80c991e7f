"""Phase 5 of the ETL (etl/build_samples.py): every feature as its index, the liked-item
sequences, and each samples file's row order.

Apart because these are the data contract's encoding rules in Spark: mkt/encoding.py states
the same rules for serving, and tests/test_serving.py holds the two identical, so a change
here is a change there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from pyspark.sql import Column, DataFrame, Window
from pyspark.sql import functions as F

from etl.config import DataConfig, Feature
from etl.raw_lines import _integer_id, _raw
from etl.split import HISTORY_KEY, LIKES_BEFORE, ROWS_BEFORE, USER
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

# Fixes the pseudo-random order of the rows inside each samples file.
ROW_ORDER_SEED = 20240901
# Vocabularies up to this many entries are broadcast to every task for the encoding joins
# (about 64 bytes each); a larger one is joined by a shuffle, which Spark plans itself.
MAX_BROADCAST_ENTRIES = 16_000_000


def _encode(
    rows: DataFrame,
    vocab: DataFrame,
    sizes: dict[str, int],
    boundaries: dict[str, list[float]],
    config: DataConfig,
) -> DataFrame:
    """Replace every raw feature value by its index (contract: 0 pad / n.a., 1 missing, 2 OOV).

    The vocabularies are broadcast (up to MAX_BROADCAST_ENTRIES), so the rows keep their
    grouping and order by user for the sequence windows.
    """
    for f in config.features:
        if f.kind == "categorical":
            keys = ["entity", _raw(f)] if f.per_entity_ids else [_raw(f)]
            key = F.col("raw_value").cast("long" if _integer_id(f, config) else "string")
            lookup = vocab.where(F.col("feature") == f.name).select(
                *(["entity"] if f.per_entity_ids else []),
                key.alias(_raw(f)),
                F.col("index").alias(f"index__{f.name}"),
            )
            if sizes.get(f.name, FIRST_INDEX) - FIRST_INDEX <= MAX_BROADCAST_ENTRIES:
                lookup = F.broadcast(lookup)
            rows = rows.join(lookup, keys, "left")
            known = F.coalesce(F.col(f"index__{f.name}"), F.lit(OOV))
            rows = rows.withColumn(f.name, _index(f, known).cast("long"))
        else:
            rows = _with_numbers(rows, [f])
            code = _bucket_code(f, boundaries[f.name], F.col(_number(f)))
            rows = rows.withColumn(f.name, code.cast("long"))
    return rows.select(
        *USER,
        "split",
        "line_no",
        "label",
        HISTORY_KEY,
        *[f.name for f in config.features],
        *([ROWS_BEFORE, LIKES_BEFORE] if config.activity else []),
    )


def _index(feature: Feature, known: Column) -> Column:
    """PAD for another entity's feature, MISSING for a missing value, else `known`."""
    return (
        F.when(~F.col("entity").isin(*feature.columns), F.lit(PAD))
        .when(F.col(_raw(feature)).isNull(), F.lit(MISSING))
        .otherwise(known)
    )


def _number(feature: Feature) -> str:
    return f"number__{feature.name}"


def _with_numbers(rows: DataFrame, features: list[Feature]) -> DataFrame:
    """Bucketized raw values parsed as numbers, each in its own projection: a cast repeated
    inside CASE WHEN is not shared, so it would be parsed once per use."""
    return rows.select(
        "*", *[F.col(_raw(f)).try_cast("double").alias(_number(f)) for f in features]
    )


def _bucket_code(feature: Feature, boundaries: list[float], value: Column) -> Column:
    """A bucketized feature's index from its parsed value: OOV when the raw value is not a
    number, else 3 + the number of boundaries <= value, as one higher-order function.

    Unrolled into one comparison per boundary, the encoding stage's generated method grew
    past 8000 bytes of bytecode, which the JVM does not JIT-compile: the stage then ran
    interpreted, at three times its CPU (docs/BENCHMARKS.md).
    """
    bucket = _bucket(boundaries, value)
    return _index(feature, F.when(value.isNull(), F.lit(OOV)).otherwise(bucket))


def _bucket(boundaries: Sequence[float], value: Column) -> Column:
    """FIRST_INDEX + the number of boundaries <= value."""
    return F.aggregate(
        F.array(*[F.lit(float(b)) for b in boundaries]).cast("array<double>"),
        F.lit(FIRST_INDEX).cast("long"),
        lambda count, b: count + (value >= b).cast("long"),
    )


def _samples(encoded: DataFrame, config: DataConfig) -> DataFrame:
    """The samples table: every encoded row with seq_<entity> / seq_<entity>_len for every
    entity, per the data contract, in the order its file stores rows.

    One window over each user's rows as the shuffle left them (ordered by HISTORY_KEY: entity,
    likes before): nothing collects a user's history, and no array exceeds seq_len. Each list
    is `max_by(item, line_no, seq_len)` over the liked rows that a frame and a mark admit: the
    items of the newest seq_len likes, newest first, kept in a heap of seq_len entries (line
    numbers are unique within an entity, so no tie makes the order depend on the row order).
    - `before__<e>`: the likes of entity e on earlier lines (the frame: the rows whose key is
      below the row's, i.e. of an earlier entity, or of e with fewer likes before; the mark
      keeps e's). Its frame grows only after a like, so Spark evaluates it once per (user,
      like count). The history of a train row of e, and of every row of e in online mode.
    - `train__<e>` / `fit__<e>`: the likes of e's train block / train + valid block (the frame:
      the whole user). What a frozen valid / test row of e sees, and what a train or valid /
      a test row of another entity sees.
    Each file's rows are then put in a pseudo-random order (_file_order), before the sequences
    are padded (so the sort moves the short arrays).
    """
    seq_len, item, entities = config.seq_len, config.item_feature, config.entity_names
    user = Window.partitionBy("user_hash", "user_key").orderBy(HISTORY_KEY)
    earlier = user.rangeBetween(Window.unboundedPreceding, -1)
    whole = user.rowsBetween(Window.unboundedPreceding, Window.unboundedFollowing)
    blocks = {
        "before": F.lit(True),
        "train": F.col("split") == "train",
        "fit": F.col("split") != "test",
    }
    # The marks (line numbers of the admitted likes, else null) in a generated projection of
    # their own: the aggregate evaluates its arguments row by row, interpreted.
    marks = {
        (kind, e): F.when((F.col("label") == 1) & (F.col("entity") == e) & block, F.col("line_no"))
        for kind, block in blocks.items()
        for e in entities
    }
    # With `sequence.activity`, the same blocks' rows and likes are counted: the whole-user
    # frame counts the train and fit blocks (rows: a mark per row of the block; likes: the
    # marks above); the "before" counts of the row's own entity come from the split.
    row_marks = {
        (kind, e): F.when((F.col("entity") == e) & block, F.lit(1))
        for kind, block in blocks.items()
        if kind != "before"
        for e in entities
    }
    counts = (
        [
            F.count(F.col(f"{mark}__{kind}__{e}")).over(whole).alias(f"{count}__{kind}__{e}")
            for (kind, e) in row_marks
            for count, mark in (("rows", "row_mark"), ("likes", "mark"))
        ]
        if config.activity
        else []
    )
    rows = encoded.select(
        "*",
        *[mark.alias(f"mark__{kind}__{e}") for (kind, e), mark in marks.items()],
        *(
            [mark.alias(f"row_mark__{kind}__{e}") for (kind, e), mark in row_marks.items()]
            if config.activity
            else []
        ),
    ).select(
        *encoded.columns,
        *[
            F.max_by(F.col(item), F.col(f"mark__{kind}__{e}"), seq_len)
            .over(earlier if kind == "before" else whole)
            .alias(f"{kind}__{e}")
            for kind, e in marks
        ],
        *counts,
    )

    def own(block: Callable[[str], Column]) -> Column:
        """The row's own entity's history, `block(kind)` being its value in each kind of
        frame: in `frozen` mode up to the end of the blocks before the row's own."""
        if config.history_mode == "online":
            return block("before")
        return (
            F.when(F.col("split") == "train", block("before"))
            .when(F.col("split") == "valid", block("train"))
            .otherwise(block("fit"))
        )

    def other(block: Callable[[str], Column]) -> Column:
        """Another entity's history up to the end of the blocks the row may look at: a test
        row sees train + valid, a valid or train row the train block, so a valid row sees as
        old a history as a test row does (docs/etl.md, "Sequences and history modes")."""
        return F.when(F.col("split") == "test", block("fit")).otherwise(block("train"))

    def history(e: str) -> Column:
        def block(kind: str) -> Column:
            return F.col(f"{kind}__{e}")

        seen = F.when(F.col("entity") == e, own(block)).otherwise(other(block))
        return F.coalesce(seen, F.array().cast("array<bigint>"))

    def activity(count: str, relation: str) -> Column:
        def block(kind: str) -> Column:
            if kind == "before":
                return F.col(ROWS_BEFORE if count == "rows" else LIKES_BEFORE)
            # The count of the entity in `relation` to the row's (two entities: the row's own
            # or the other one).
            value = F.when(F.lit(False), F.lit(0))
            for e in entities:
                (partner,) = [p for p in entities if (p == e) == (relation == "own")]
                value = value.when(F.col("entity") == e, F.col(f"{count}__{kind}__{partner}"))
            return value

        seen = own(block) if relation == "own" else other(block)
        # A comparison chain, which Spark generates code for, where `_bucket`'s higher-order
        # function runs interpreted: 10 CPU s less at 5M rows (docs/BENCHMARKS.md).
        bucket = F.when(F.lit(False), F.lit(0))
        for i, boundary in enumerate(ACTIVITY_BOUNDARIES):
            bucket = bucket.when(seen < boundary, FIRST_INDEX + i)
        return bucket.otherwise(FIRST_INDEX + len(ACTIVITY_BOUNDARIES)).cast("long")

    columns = [
        "entity",
        "split",
        "line_no",
        "user_key",
        "label",
        *[f.name for f in config.features],
    ]
    # Only the lists a row keeps go through the sort, which copies whole rows.
    activities = [
        (activity_feature(count, relation), activity(count, relation))
        for relation in ACTIVITY_RELATIONS
        for count in ACTIVITY_COUNTS
        if config.activity
    ]
    rows = rows.select(
        *columns,
        *[value.alias(name) for name, value in activities],
        *[history(e).alias(f"history__{e}") for e in entities],
    ).sortWithinPartitions(_file_order(config))
    columns += [name for name, _ in activities]
    sequences = []
    for entity in entities:
        newest_first = F.col(f"history__{entity}")
        padding = F.array_repeat(F.lit(PAD).cast("long"), seq_len - F.size(newest_first))
        sequences += [
            F.concat(newest_first, padding).alias(f"seq_{entity}"),
            F.size(newest_first).cast("long").alias(f"seq_{entity}_len"),
        ]
    return rows.select(*columns, *sequences)


def _file_order(config: DataConfig) -> Column:
    """One sort key, so that Spark radix-sorts it: the row's (entity, split) partition in the
    top bits, a hash of (ROW_ORDER_SEED, user_key, line_no) below. Sorting by the three
    columns cost twice as much as the radix sort and the file writing together."""
    partitions = [(e, s) for e in config.entity_names for s in SPLITS]
    ordinal = F.when(F.lit(False), 0)
    for i, (entity, split) in enumerate(partitions):
        ordinal = ordinal.when((F.col("entity") == entity) & (F.col("split") == split), i)
    shift = 63 - len(partitions).bit_length()
    row_hash = F.xxhash64(F.lit(ROW_ORDER_SEED), "user_key", "line_no")
    return F.shiftleft(ordinal.cast("long"), shift).bitwiseOR(
        F.shiftrightunsigned(row_hash, 64 - shift)
    )
