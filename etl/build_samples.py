"""Build MKT's training samples from two raw entity files (docs/etl.md, docs/data-contract.md).

    spark-submit etl/build_samples.py --config conf/data/tenrec.yaml --input RAW_DIR --output OUT_DIR

Writes under OUT_DIR the Delta tables ``samples`` (partitioned by entity and split), ``vocab``
and ``quarantine``, then ``feature_schema.json`` (everything the trainer needs to build its
embeddings) and ``etl_summary.json``. Python entry: :func:`build_samples`.

Phases (each logs one line):
 1. check the config and the raw files' headers (fails before anything is written);
 2. number every raw line (line_no), parse and validate it; bad lines -> quarantine;
 3. split each user's rows of an entity in line order (train / valid / test) and count, per row,
    the likes its history may use;
 4. vocabularies and bucket boundaries from the train split; encode every feature as an index;
 5. liked-item sequences, bounded per user by seq_len;
 6. summary, then commit the Delta tables and the schema file.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):
    # spark-submit runs this file as a script; make `import etl` resolve to this repository.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse
import json
import logging
import os
import time
import uuid
from functools import reduce
from typing import Any

from pyspark import SparkConf
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from etl.config import ConfigError, DataConfig, Feature, load_config
from etl.storage import HadoopFs, Writer, WriterError, resolve_writer, write_delta

log = logging.getLogger("etl.build_samples")

# Reserved indices of every categorical / bucketized feature and sequence (data contract).
PAD, MISSING, OOV = 0, 1, 2
FIRST_INDEX = 3
MISSING_TOKENS = ("\\N", "")
SPLITS = ("train", "valid", "test")
SCHEMA_FILE = "feature_schema.json"
SUMMARY_FILE = "etl_summary.json"
TABLES = {"samples": ["entity", "split"], "vocab": [], "quarantine": []}


class InputError(ValueError):
    """A raw input file is missing or unreadable; the message names the file."""


def build_samples(
    spark: SparkSession,
    config_path: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    history_mode: str | None = None,
    seq_len: int | None = None,
    duplicates: str | None = None,
    writer: Writer = "auto",
) -> dict[str, Any]:
    """Run the whole job with the caller's SparkSession; return the summary dict.

    Keyword options override the config file. Raises ConfigError / InputError, before writing
    anything, when the config, a raw file or one of its columns is wrong.
    """
    started = time.monotonic()
    config = load_config(config_path).with_overrides(
        history_mode=history_mode, seq_len=seq_len, duplicates=duplicates
    )
    input_dir, output_dir = _qualify(input_dir), _qualify(output_dir)
    fs = HadoopFs(spark)
    chosen_writer = resolve_writer(spark, writer)

    def phase(number: int, text: str) -> None:
        log.info("[%d/6 %6.1fs] %s", number, time.monotonic() - started, text)
        # Names the phase's jobs in the Spark UI and event log (jobs/bench_etl.py reads it).
        spark.sparkContext.setJobDescription(f"[{number}/6] {text}")

    phase(1, f"checking {config_path} against the headers of {input_dir}")
    paths = {e.name: f"{input_dir}/{e.file}" for e in config.entities}
    headers = {e: _read_header(spark, fs, config, e, paths[e]) for e in config.entity_names}

    # A run killed before its `finally` leaves its staging dir behind; a job owns its OUT_DIR
    # (one writer at a time), so anything left there is garbage.
    for leftover in fs.glob(f"{output_dir}/_staging-*"):
        log.info("removing %s, left by an interrupted run", leftover)
        fs.delete(leftover)
    staging = f"{output_dir}/_staging-{uuid.uuid4().hex[:12]}"
    stage = _Stager(spark, staging)
    try:
        phase(2, "numbering, parsing and validating raw lines")
        lines = [_parse_lines(spark, config, e, paths[e], headers[e]) for e in config.entity_names]
        parsed = stage("parsed", _mark_duplicates(reduce(_union, lines)))

        phase(3, f"splitting users' rows (history mode {config.history_mode})")
        ranked = stage("ranked", _split_and_history(_kept_rows(parsed, config), config))

        phase(4, "vocabularies and buckets on the train split; encoding features")
        categorical_vocab = stage("vocab_categorical", _categorical_vocab(ranked, config))
        boundaries = _bucket_boundaries(ranked, config)
        encoded = stage("encoded", _encode(ranked, categorical_vocab, boundaries, config))
        vocab = stage(
            "vocab",
            categorical_vocab.unionByName(_bucket_vocab(spark, encoded, boundaries, config)),
        )

        phase(5, f"liked-item sequences (seq_len {config.seq_len})")
        samples = stage("samples", _with_sequences(encoded, config))
        stage(
            "quarantine",
            parsed.where(F.col("reason").isNotNull()).select(
                "entity", "line_no", "raw_line", "reason"
            ),
        )

        phase(6, f"summary; committing Delta tables ({chosen_writer} writer) to {output_dir}")
        summary = _summarize(parsed, samples, config)
        schema = _feature_schema(config, vocab, boundaries, input_dir, summary)
        # Each table commits atomically, but the three commits are not one transaction: the
        # schema file, written last, names the versions that belong together.
        schema["table_versions"] = {
            table: write_delta(
                spark, stage.path(table), f"{output_dir}/{table}", partition_by, chosen_writer
            )
            for table, partition_by in TABLES.items()
        }
        summary["table_versions"] = schema["table_versions"]
        summary["output_dir"] = output_dir
        summary["writer"] = chosen_writer
        summary["wall_s"] = round(time.monotonic() - started, 1)
        # The schema file goes last, once the tables it describes are committed.
        fs.write_text(f"{output_dir}/{SUMMARY_FILE}", json.dumps(summary, indent=2) + "\n")
        fs.write_text(f"{output_dir}/{SCHEMA_FILE}", json.dumps(schema, indent=2) + "\n")
    finally:
        fs.delete(staging)
        spark.sparkContext.setJobDescription(None)
    _log_summary(summary)
    return summary


# --------------------------------------------------------------------------------------------
# Phase 1: inputs.
# --------------------------------------------------------------------------------------------


def _qualify(path: str | Path) -> str:
    """Absolute local path, or the URI unchanged (hdfs://, s3a://, file:/...)."""
    text = str(path)
    return text if "://" in text or text.startswith("file:") else os.path.abspath(text)


def _read_header(
    spark: SparkSession, fs: HadoopFs, config: DataConfig, entity: str, path: str
) -> list[str]:
    if not fs.is_file(path):
        raise InputError(f"entities.{entity}.file: raw file not found: {path}")
    # The header is line 0: the first line of the split that starts at byte 0.
    first = spark.read.text(path).where(F.col("_metadata.file_block_start") == 0).limit(1).collect()
    if not first:
        raise InputError(f"entities.{entity}.file: {path} is empty (no header line)")
    header = [c.strip() for c in first[0].value.lstrip("\ufeff").split(",")]
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise InputError(f"{path}: header repeats column(s) {repeated}")
    config.check_header(entity, header)
    return header


# --------------------------------------------------------------------------------------------
# Phase 2: raw lines.
# --------------------------------------------------------------------------------------------


def _numbered_lines(spark: SparkSession, path: str) -> DataFrame:
    """(line_no, raw_line) for every line of the file, the header being line 0.

    Exact file order without collecting or zipWithIndex: every input split (byte range
    starting at file_block_start) lies in one scan partition, and inside it
    monotonically_increasing_id counts up in file order. A line's number is therefore the
    number of lines in the earlier splits plus its position in its own split. The per-split
    line counts are one small aggregation (one row per split).
    """
    lines = spark.read.text(path).select(
        F.col("value").alias("raw_line"),
        F.col("_metadata.file_block_start").alias("block_start"),
        F.monotonically_increasing_id().alias("row_id"),
    )
    blocks = (
        lines.groupBy("block_start")
        .agg(F.min("row_id").alias("first_row_id"), F.count(F.lit(1)).alias("lines"))
        .orderBy("block_start")
        .collect()
    )
    offsets, before = [], 0
    for block in blocks:
        offsets.append((block.block_start, block.first_row_id, before))
        before += block.lines
    offsets_df = spark.createDataFrame(
        offsets, "block_start long, first_row_id long, lines_before long"
    )
    return lines.join(F.broadcast(offsets_df), "block_start").select(
        (F.col("row_id") - F.col("first_row_id") + F.col("lines_before")).alias("line_no"),
        "raw_line",
    )


def _parse_lines(
    spark: SparkSession, config: DataConfig, entity: str, path: str, header: list[str]
) -> DataFrame:
    """One row per data line: its number, raw text, quarantine reason (null if good), fields.

    Fields are split by hand rather than by Spark's CSV reader, which would turn a malformed
    line into nulls silently; here every bad line gets a reason. Columns are found by header
    name, so a file with reordered columns reads the same.

    Each step is its own projection so that the line is split once and every field trimmed
    and cast once: inside a CASE WHEN branch Spark does not share a repeated subexpression.
    """
    ids = list(dict.fromkeys((config.user_key, *config.id_columns)))
    feature_columns = {f.columns[entity] for f in config.features_of(entity)}
    columns = list(dict.fromkeys([*ids, config.label, *sorted(feature_columns)]))
    lines = (
        _numbered_lines(spark, path)
        .where(F.col("line_no") >= 1)
        .select(
            "line_no",
            # A string column must hold UTF-8: such lines are quarantined with their bad bytes
            # replaced by U+FFFD (line_no still points at the raw line).
            F.make_valid_utf8("raw_line").alias("raw_line"),
            F.is_valid_utf8("raw_line").alias("utf8"),
            F.split(F.col("raw_line"), ",", -1).alias("fields"),
        )
        .select(
            "line_no",
            "raw_line",
            "utf8",
            F.size("fields").alias("n_fields"),
            *[F.trim(F.get("fields", header.index(c))).alias(f"f__{c}") for c in columns],
        )
        .select("*", *[F.col(f"f__{c}").try_cast("long").alias(f"id__{c}") for c in ids])
    )
    reason = F.when(~F.col("utf8"), F.lit("invalid UTF-8")).when(
        F.col("n_fields") != len(header),
        F.format_string(f"wrong column count: %d, expected {len(header)}", F.col("n_fields")),
    )
    for column in ids:
        value = F.col(f"f__{column}")
        reason = reason.when(value == "", F.lit(f"empty {column}")).when(
            F.col(f"id__{column}").isNull(),
            F.concat(F.lit(f"non-numeric {column}: '"), value, F.lit("'")),
        )
    label = F.col(f"f__{config.label}")
    reason = reason.when(
        ~label.isin("0", "1"),
        F.concat(F.lit(f"label {config.label} not in {{0,1}}: '"), label, F.lit("'")),
    )

    def raw_value(column: str) -> Column:
        # An id is an integer: its canonical text is its value, so ' 7', '+7' and '007' are
        # the same user or item, as user_key says.
        if column in ids:
            return F.col(f"id__{column}").cast("string")
        # Missing (`\N` or empty) becomes null here, once, so later phases test only isNull.
        value = F.col(f"f__{column}")
        return F.when(~value.isin(*MISSING_TOKENS), value)

    return lines.select(
        F.lit(entity).alias("entity"),
        "line_no",
        "raw_line",
        reason.alias("reason"),
        F.col(f"id__{config.user_key}").alias("user_key"),
        label.try_cast("tinyint").alias("label"),
        *[raw_value(f.columns[entity]).alias(_raw(f)) for f in config.features_of(entity)],
    )


def _mark_duplicates(parsed: DataFrame) -> DataFrame:
    """occurrence = 1 for the first copy of a raw line in its file, 2 for the next, ...

    Identical raw lines are either all good or all bad, so a bad line's occurrence is unused.
    """
    copies = Window.partitionBy("entity", "raw_line").orderBy("line_no")
    return parsed.withColumn("occurrence", F.row_number().over(copies))


def _kept_rows(parsed: DataFrame, config: DataConfig) -> DataFrame:
    good = parsed.where(F.col("reason").isNull())
    if config.duplicates == "drop":
        good = good.where(F.col("occurrence") == 1)
    return good.drop("raw_line", "reason", "occurrence")


# --------------------------------------------------------------------------------------------
# Phase 3: split and history.
# --------------------------------------------------------------------------------------------


def _split_and_history(rows: DataFrame, config: DataConfig) -> DataFrame:
    """Add split, likes_before, likes_fit and history_likes to every kept row.

    Per (entity, user), rows in line order; n rows, n_test = floor(test_fraction * n + 0.5)
    last rows are test, of n_fit = n - n_test the last floor(valid_fraction * n_fit + 0.5)
    are valid. history_likes is how many of the user's likes in this entity (counted in line
    order) the row's own-entity sequence may use: all likes on earlier lines for a train row
    (and for every row in online mode); in frozen mode, a valid row uses only the train
    likes and a test row only the train + valid likes. likes_fit (train + valid likes) is
    what the other entities' rows may use.
    """
    user = Window.partitionBy("entity", "user_key")
    in_order = user.orderBy("line_no")
    rows = rows.select(
        "*",
        F.row_number().over(in_order).alias("rank"),
        F.count(F.lit(1)).over(user).alias("n"),
        F.coalesce(
            F.sum("label").over(in_order.rowsBetween(Window.unboundedPreceding, -1)), F.lit(0)
        ).alias("likes_before"),
    )
    n_test = F.floor(F.col("n") * config.test_fraction + 0.5)
    n_fit = F.col("n") - n_test
    n_train = n_fit - F.floor(n_fit * config.valid_fraction + 0.5)
    split = (
        F.when(F.col("rank") <= n_train, "train")
        .when(F.col("rank") <= n_fit, "valid")
        .otherwise("test")
    )
    rows = rows.withColumn("split", split)

    def likes_in(*splits: str) -> Column:
        return F.sum(F.when(F.col("split").isin(*splits), F.col("label")).otherwise(0)).over(user)

    rows = rows.withColumn("likes_train", likes_in("train")).withColumn(
        "likes_fit", likes_in("train", "valid")
    )
    if config.history_mode == "online":
        history = F.col("likes_before")
    else:
        history = (
            F.when(F.col("split") == "train", F.col("likes_before"))
            .when(F.col("split") == "valid", F.col("likes_train"))
            .otherwise(F.col("likes_fit"))
        )
    return rows.withColumn("history_likes", history.cast("long")).drop("rank", "n", "likes_train")


# --------------------------------------------------------------------------------------------
# Phase 4: vocabularies, buckets, encoding.
# --------------------------------------------------------------------------------------------


def _raw(feature: Feature) -> str:
    return f"raw__{feature.name}"


def _categorical_vocab(ranked: DataFrame, config: DataConfig) -> DataFrame:
    """(feature, entity, raw_value, index, count) from the train split.

    Index 3.. by descending train count, then entity, then raw value. `entity` is null except
    for per-entity id spaces (Tenrec's item_id), where one vocabulary holds (entity, value).
    """
    train = ranked.where(F.col("split") == "train")
    parts = []
    for entity in config.entity_names:
        features = [f for f in config.features_of(entity) if f.kind == "categorical"]
        entries = F.explode(
            F.array(
                *[
                    F.struct(
                        F.lit(f.name).alias("feature"),
                        (F.lit(entity) if f.per_entity_ids else F.lit(None).cast("string")).alias(
                            "entity"
                        ),
                        F.col(_raw(f)).alias("raw_value"),
                    )
                    for f in features
                ]
            )
        )
        parts.append(
            train.where(F.col("entity") == entity).select(entries.alias("e")).select("e.*")
        )
    counts = (
        reduce(_union, parts)
        .where(F.col("raw_value").isNotNull())
        .groupBy("feature", "entity", "raw_value")
        .agg(F.count(F.lit(1)).alias("count"))
    )
    order = Window.partitionBy("feature").orderBy(
        F.desc("count"), F.asc_nulls_first("entity"), "raw_value"
    )
    return counts.select(
        "feature",
        "entity",
        "raw_value",
        (F.row_number().over(order) + (FIRST_INDEX - 1)).cast("long").alias("index"),
        "count",
    )


def _bucketized(config: DataConfig) -> list[Feature]:
    return [f for f in config.features if f.kind == "bucketized"]


def _bucket_boundaries(ranked: DataFrame, config: DataConfig) -> dict[str, list[float]]:
    """Distinct train quantiles at 1/B, ..., (B-1)/B of every bucketized feature (one job).

    Bucket i (0-based) holds boundaries[i-1] <= value < boundaries[i]; index = 3 + i. A
    quantile equal to the train minimum is dropped: it would open an always-empty first bucket.
    """
    features = _bucketized(config)
    if not features:
        return {}
    train = ranked.where(F.col("split") == "train")
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


def _encode(
    ranked: DataFrame,
    vocab: DataFrame,
    boundaries: dict[str, list[float]],
    config: DataConfig,
) -> DataFrame:
    """Replace every raw feature value by its index (contract: 0 pad / n.a., 1 missing, 2 OOV)."""
    rows = ranked
    for f in config.features:
        raw = F.col(_raw(f))
        if f.kind == "categorical":
            keys = ["entity", _raw(f)] if f.per_entity_ids else [_raw(f)]
            lookup = vocab.where(F.col("feature") == f.name).select(
                *(["entity"] if f.per_entity_ids else []),
                F.col("raw_value").alias(_raw(f)),
                F.col("index").alias(f"index__{f.name}"),
            )
            rows = rows.join(lookup, keys, "left")
            known = F.coalesce(F.col(f"index__{f.name}"), F.lit(OOV))
        else:
            # Parsed once, in its own projection (a repeated cast inside CASE WHEN is not shared).
            rows = rows.withColumn(f"number__{f.name}", raw.try_cast("double"))
            value = F.col(f"number__{f.name}")
            known = F.when(value.isNull(), F.lit(OOV)).otherwise(
                _bucket_index(value, boundaries[f.name])
            )
        index = (
            F.when(~F.col("entity").isin(*f.columns), F.lit(PAD))
            .when(raw.isNull(), F.lit(MISSING))
            .otherwise(known)
        )
        rows = rows.withColumn(f.name, index.cast("long"))
    return rows.select(
        "entity",
        "split",
        "line_no",
        "user_key",
        "label",
        *[f.name for f in config.features],
        "likes_before",
        "likes_fit",
        "history_likes",
    )


def _bucket_index(value: Column, boundaries: list[float]) -> Column:
    """3 + the number of boundaries <= value, as one higher-order function.

    Unrolled into one comparison per boundary, the encoding stage's generated method grew
    past 8000 bytes of bytecode, which the JVM does not JIT-compile: the stage then ran
    interpreted, at three times its CPU (docs/BENCHMARKS.md).
    """
    return F.aggregate(
        F.array(*[F.lit(b) for b in boundaries]).cast("array<double>"),
        F.lit(FIRST_INDEX).cast("long"),
        lambda count, b: count + (value >= b).cast("long"),
    )


def _bucket_vocab(
    spark: SparkSession,
    encoded: DataFrame,
    boundaries: dict[str, list[float]],
    config: DataConfig,
) -> DataFrame:
    """One vocab row per bucket: raw_value = the bucket's lower bound, count = train rows."""
    features = _bucketized(config)
    counts: dict[tuple[str, int], int] = {}
    if features:
        per_bucket = (
            encoded.where(F.col("split") == "train")
            .select(
                F.explode(
                    F.array(
                        *[
                            F.struct(F.lit(f.name).alias("feature"), F.col(f.name).alias("index"))
                            for f in features
                        ]
                    )
                ).alias("b")
            )
            .groupBy("b.feature", "b.index")
            .count()
            .collect()
        )
        counts = {(r["feature"], r["index"]): r["count"] for r in per_bucket}
    rows = []
    for f in features:
        for i, lower in enumerate([float("-inf"), *boundaries[f.name]]):
            index = FIRST_INDEX + i
            rows.append((f.name, None, repr(lower), index, counts.get((f.name, index), 0)))
    return spark.createDataFrame(
        rows, "feature string, entity string, raw_value string, index long, count long"
    )


# --------------------------------------------------------------------------------------------
# Phase 5: sequences.
# --------------------------------------------------------------------------------------------


def _with_sequences(encoded: DataFrame, config: DataConfig) -> DataFrame:
    """Add seq_<entity> / seq_<entity>_len for every entity, per the data contract.

    Bounded per user: instead of collecting a user's whole history, every like carries a
    snapshot of the <= seq_len likes up to and including it (a sliding window frame). A row
    whose history may use its user's first k likes in its own entity joins the snapshot of
    like k. Other entities contribute the snapshot at their last train/valid like.
    """
    seq_len, item = config.seq_len, config.item_feature
    user = ["entity", "user_key"]
    recent = Window.partitionBy(*user).orderBy("line_no").rowsBetween(-(seq_len - 1), 0)
    snapshots = encoded.where(F.col("label") == 1).select(
        *user,
        (F.col("likes_before") + 1).alias("like_no"),
        "likes_fit",
        F.collect_list(item).over(recent).alias("items"),
    )
    own = snapshots.select(
        *user, F.col("like_no").alias("history_likes"), F.col("items").alias("own_items")
    )
    entities = list(config.entity_names)
    fit = (
        snapshots.where(F.col("like_no") == F.col("likes_fit"))
        .groupBy("user_key")
        .pivot("entity", entities)
        .agg(F.first("items"))
        .select("user_key", *[F.col(e).alias(f"fit_items__{e}") for e in entities])
    )
    rows = encoded.join(own, [*user, "history_likes"], "left").join(fit, "user_key", "left")
    sequences = []
    for entity in entities:
        items = F.when(F.col("entity") == entity, F.col("own_items")).otherwise(
            F.col(f"fit_items__{entity}")
        )
        newest_first = F.reverse(F.coalesce(items, F.array().cast("array<bigint>")))
        padding = F.array_repeat(F.lit(PAD).cast("long"), seq_len - F.size(newest_first))
        sequences += [
            F.concat(newest_first, padding).alias(f"seq_{entity}"),
            F.size(newest_first).cast("long").alias(f"seq_{entity}_len"),
        ]
    return rows.select(
        "entity",
        "split",
        "line_no",
        "user_key",
        "label",
        *[f.name for f in config.features],
        *sequences,
    )


# --------------------------------------------------------------------------------------------
# Phase 6: summary and schema.
# --------------------------------------------------------------------------------------------


def _summarize(parsed: DataFrame, samples: DataFrame, config: DataConfig) -> dict[str, Any]:
    """Counts per entity and split; raises if input lines != samples + quarantined + removed."""
    duplicate = F.col("reason").isNull() & (F.col("occurrence") > 1)
    lines = {
        r.entity: r
        for r in parsed.groupBy("entity")
        .agg(
            F.count(F.lit(1)).alias("input_lines"),
            F.count(F.col("reason")).alias("quarantined"),
            F.count(F.when(duplicate, 1)).alias("duplicates"),
        )
        .collect()
    }
    reasons: dict[str, dict[str, int]] = {e: {} for e in config.entity_names}
    for r in (
        parsed.where(F.col("reason").isNotNull())
        .groupBy("entity", F.substring_index("reason", ":", 1).alias("kind"))
        .count()
        .collect()
    ):
        reasons[r.entity][r.kind] = r["count"]
    per_split = {
        (r.entity, r.split): r
        for r in samples.groupBy("entity", "split")
        .agg(
            F.count(F.lit(1)).alias("rows"),
            F.avg("label").alias("like_rate"),
            F.countDistinct("user_key").alias("users"),
        )
        .collect()
    }
    users = {
        r.entity: r.users
        for r in samples.groupBy("entity").agg(F.countDistinct("user_key").alias("users")).collect()
    }
    overlap = {
        r.entities: r["count"]
        for r in samples.select("user_key", "entity")
        .distinct()
        .groupBy("user_key")
        .agg(F.concat_ws("+", F.sort_array(F.collect_list("entity"))).alias("entities"))
        .groupBy("entities")
        .count()
        .collect()
    }

    entities = {}
    for e in config.entity_names:
        line = lines.get(e)
        input_lines = line.input_lines if line else 0
        quarantined = line.quarantined if line else 0
        found = line.duplicates if line else 0
        removed = found if config.duplicates == "drop" else 0
        splits = {
            s: {
                "rows": per_split[(e, s)].rows if (e, s) in per_split else 0,
                "like_rate": per_split[(e, s)].like_rate if (e, s) in per_split else None,
                "users": per_split[(e, s)].users if (e, s) in per_split else 0,
            }
            for s in SPLITS
        }
        rows = sum(s["rows"] for s in splits.values())
        if input_lines != rows + quarantined + removed:
            raise RuntimeError(
                f"{e}: {input_lines} input lines != {rows} samples + {quarantined} quarantined "
                f"+ {removed} removed duplicates"
            )
        entities[e] = {
            "input_lines": input_lines,
            "samples": rows,
            "quarantined": quarantined,
            "quarantine_reasons": reasons[e],
            "duplicates_found": found,
            "duplicates_removed": removed,
            "users": users.get(e, 0),
            "splits": splits,
        }
    return {
        "dataset": config.name,
        "history_mode": config.history_mode,
        "duplicates": config.duplicates,
        "seq_len": config.seq_len,
        "entities": entities,
        "user_overlap": dict(sorted(overlap.items())),
    }


def _feature_schema(
    config: DataConfig,
    vocab: DataFrame,
    boundaries: dict[str, list[float]],
    input_dir: str,
    summary: dict[str, Any],
) -> dict[str, Any]:
    sizes = {
        r.feature: r.size
        for r in vocab.groupBy("feature").agg((F.max("index") + 1).alias("size")).collect()
    }

    def vocab_size(f: Feature) -> int:
        if f.kind == "bucketized":
            return FIRST_INDEX + len(boundaries[f.name]) + 1
        return sizes.get(f.name, FIRST_INDEX)

    # As `_parse_lines` checks and canonicalises them.
    id_columns = {config.user_key, *config.id_columns}
    features: list[dict[str, Any]] = []
    for f in config.features:
        entry: dict[str, Any] = {
            "name": f.name,
            "group": f.group,
            "entity": f.entity,
            "kind": f.kind,
            "vocab_size": vocab_size(f),
        }
        if f.kind == "bucketized":
            entry["boundaries"] = boundaries[f.name]
        integer_id = [e for e in config.entity_names if f.columns.get(e) in id_columns]
        if integer_id:
            entry["integer_id"] = integer_id
        features.append(entry)
    item = config.feature(config.item_feature)
    for e in config.entity_names:
        features.append(
            {
                "name": f"seq_{e}",
                "group": "sequence",
                "entity": e,
                "kind": "sequence",
                "item_feature": item.name,
                "vocab_size": vocab_size(item),
                "seq_len": config.seq_len,
                "length_column": f"seq_{e}_len",
            }
        )
    return {
        "format_version": 1,
        "dataset": config.name,
        "source_entity": config.source_entity,
        "target_entity": config.target_entity,
        "entities": list(config.entity_names),
        "seq_len": config.seq_len,
        "history_mode": config.history_mode,
        "reserved_indices": {"padding": PAD, "missing": MISSING, "oov": OOV},
        "item_feature": item.name,
        "features": features,
        "columns": {c: c for c in ("entity", "split", "line_no", "user_key", "label")},
        "raw_input": {
            "dir": input_dir,
            "files": {e.name: e.file for e in config.entities},
        },
        "counts": {
            e: {s: v["splits"][s]["rows"] for s in SPLITS} for e, v in summary["entities"].items()
        },
    }


def _log_summary(summary: dict[str, Any]) -> None:
    for entity, s in summary["entities"].items():
        log.info(
            "%s: %d input lines = %d samples + %d quarantined + %d removed duplicates "
            "(%d duplicates found); %d users",
            entity,
            s["input_lines"],
            s["samples"],
            s["quarantined"],
            s["duplicates_removed"],
            s["duplicates_found"],
            s["users"],
        )
        for split, v in s["splits"].items():
            rate = "n/a" if v["like_rate"] is None else f"{v['like_rate']:.4f}"
            log.info("  %-5s %9d rows, like rate %s, %d users", split, v["rows"], rate, v["users"])
        if s["quarantine_reasons"]:
            log.info("  quarantine reasons: %s", s["quarantine_reasons"])
    log.info("user overlap (users by the entities they appear in): %s", summary["user_overlap"])
    log.info(
        "history mode %s, duplicates %s, %.1fs, written to %s",
        summary["history_mode"],
        summary["duplicates"],
        summary["wall_s"],
        summary["output_dir"],
    )


# --------------------------------------------------------------------------------------------
# Plumbing.
# --------------------------------------------------------------------------------------------


def _union(a: DataFrame, b: DataFrame) -> DataFrame:
    return a.unionByName(b, allowMissingColumns=True)


class _Stager:
    """Writes an intermediate frame as Parquet under the run's staging dir and reads it back.

    Cutting the lineage here makes every later phase read fixed data once (line numbers
    are computed exactly once) and keeps Spark from recomputing shared inputs per branch.
    """

    def __init__(self, spark: SparkSession, root: str) -> None:
        self._spark = spark
        self._root = root

    def path(self, name: str) -> str:
        return f"{self._root}/{name}"

    def __call__(self, name: str, frame: DataFrame) -> DataFrame:
        context = self._spark.sparkContext
        phase = context.getLocalProperty("spark.job.description")
        context.setJobDescription(f"{phase} | stage {name}")
        try:
            frame.write.mode("overwrite").parquet(self.path(name))
        finally:
            context.setJobDescription(phase)
        return self._spark.read.parquet(self.path(name))


def _spark_session() -> SparkSession:
    """The script's session: spark-submit's --master/--conf win; local runs bind to 127.0.0.1."""
    submitted = SparkConf()
    builder = SparkSession.builder.appName("mkt-build-samples")
    master = submitted.get("spark.master", "local[*]")
    if not submitted.contains("spark.master"):
        builder = builder.master(master)
    if master.startswith("local"):
        local_defaults = {
            "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1",
            # The UI would listen on every interface; opt in with --conf spark.ui.enabled=true.
            "spark.ui.enabled": "false",
        }
        for key, value in local_defaults.items():
            if not submitted.contains(key):
                builder = builder.config(key, value)
    return builder.getOrCreate()


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="data config YAML (conf/data/*.yaml)")
    parser.add_argument("--input", required=True, help="RAW_DIR holding the raw entity files")
    parser.add_argument("--output", required=True, help="OUT_DIR for the Delta tables")
    parser.add_argument("--history-mode", choices=("frozen", "online"), help="override config")
    parser.add_argument("--seq-len", type=int, help="override config sequence.seq_len")
    parser.add_argument("--duplicates", choices=("keep", "drop"), help="override config")
    parser.add_argument(
        "--writer",
        choices=("auto", "spark", "rs"),
        default="auto",
        help="Delta writer: delta-spark, delta-rs, or auto (delta-spark if on the classpath)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    # Our progress lines only; py4j and Spark keep their own log levels.
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s [etl] %(message)s"))
    logging.getLogger("etl").addHandler(handler)
    logging.getLogger("etl").setLevel(logging.INFO)
    try:
        # Validate the config before paying for a SparkSession.
        load_config(args.config)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    spark = _spark_session()
    spark.sparkContext.setLogLevel("WARN")
    try:
        summary = build_samples(
            spark,
            args.config,
            args.input,
            args.output,
            history_mode=args.history_mode,
            seq_len=args.seq_len,
            duplicates=args.duplicates,
            writer=args.writer,
        )
    except (ConfigError, InputError, WriterError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        spark.stop()
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
