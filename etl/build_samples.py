"""Build MKT's training samples from two raw entity files (docs/etl.md, docs/data-contract.md).

    spark-submit etl/build_samples.py --config conf/data/tenrec.yaml --input RAW_DIR --output OUT_DIR

Writes under OUT_DIR the Delta tables ``samples`` (partitioned by entity and split), ``vocab``
and ``quarantine``, then ``feature_schema.json`` (everything the trainer needs to build its
embeddings) and ``etl_summary.json``. Python entry: :func:`build_samples`.

Phases (each logs one line):
 1. check the config and the raw files' headers (fails before anything is written);
 2. number every raw line (line_no), parse and validate it; bad lines -> quarantine;
 3. one shuffle by user: split each user's rows of an entity in line order (train / valid /
    test), count likes; the summary's counts, checked to reconcile;
 4. vocabularies and bucket boundaries from the train split;
 5. encode every feature as an index; liked-item sequences, bounded per user by seq_len; write
    the samples' files;
 6. write vocab and quarantine, commit the three Delta tables, then the schema file.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import uuid
from functools import reduce
from pathlib import Path
from typing import Any

from pyspark import SparkConf, StorageLevel
from pyspark.sql import Column, DataFrame, SparkSession, Window
from pyspark.sql import functions as F

from etl.config import DataConfig, Feature, load_config
from etl.storage import (
    HadoopFs,
    Writer,
    WriterError,
    discard_uncommitted,
    resolve_writer,
    write_table,
)
from mkt.contract import (
    FIRST_INDEX,
    MISSING,
    MISSING_TOKENS,
    OOV,
    PAD,
    QUARANTINE_TABLE,
    SAMPLES_TABLE,
    SCHEMA_FILE,
    SPLITS,
    VOCAB_TABLE,
    ConfigError,
)
from mkt.schema import Feature as SchemaFeature
from mkt.schema import FeatureSchema

log = logging.getLogger("etl.build_samples")

SUMMARY_FILE = "etl_summary.json"
# Each table of OUT_DIR with its partition columns.
TABLES = {SAMPLES_TABLE: ["entity", "split"], VOCAB_TABLE: [], QUARANTINE_TABLE: []}
STAGING_PREFIX = "_staging-"
# A tiny input gets fewer samples files than files_per_partition: at most one per this many
# input lines, so a few hundred lines are not cut into a dozen near-empty files.
MIN_LINES_PER_FILE = 256
# Fixes the pseudo-random order of the rows inside each samples file.
ROW_ORDER_SEED = 20240901
# Vocabularies up to this many entries are broadcast to every task for the encoding joins
# (about 64 bytes each); a larger one is joined by a shuffle, which Spark plans itself.
MAX_BROADCAST_ENTRIES = 16_000_000
CACHE_COMPRESSION = "spark.sql.inMemoryColumnarStorage.compressed"
CONCURRENT_WRITERS = "spark.sql.maxConcurrentOutputFileWriters"
ADAPTIVE = "spark.sql.adaptive.enabled"
SHUFFLE_PARTITIONS = "spark.sql.shuffle.partitions"
# The columns of every row between the shuffle by user and the encoding.
USER = ["user_hash", "user_key", "entity"]


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
        # Names the phase's jobs in the Spark UI and event log (benchmarks/bench_etl.py reads it).
        spark.sparkContext.setJobDescription(f"[{number}/6] {text}")

    phase(1, f"checking {config_path} against the headers of {input_dir}")
    paths = {e.name: f"{input_dir}/{e.file}" for e in config.entities}
    headers = {e: _read_header(fs, config, e, paths[e]) for e in config.entity_names}

    # A run killed before its `finally` leaves its staging dir behind, and maybe table files it
    # never committed; a job owns its OUT_DIR (one writer at a time), so they are garbage.
    for leftover in fs.glob(f"{output_dir}/{STAGING_PREFIX}*"):
        log.info("removing %s and its uncommitted files, left by an interrupted run", leftover)
        _discard_run(fs, output_dir, leftover.rsplit(STAGING_PREFIX, 1)[1])
    run_id = uuid.uuid4().hex[:12]
    stage = _Stager(spark, f"{output_dir}/{STAGING_PREFIX}{run_id}")
    cached: list[DataFrame] = []

    def persist(frame: DataFrame) -> DataFrame:
        # Kept with its partitioning and order: later windows and aggregations by user need no
        # shuffle and no sort. Uncompressed: choosing and applying a compression scheme per
        # column cost more CPU than the shuffle read, sorts and windows of that stage together
        # (1M rows: 8.6 CPU s, 5.6 s without), for 17% more memory; past its share of the
        # heap the cache spills to local disk.
        compressed = spark.conf.get(CACHE_COMPRESSION)
        spark.conf.set(CACHE_COMPRESSION, "false")
        try:
            cached.append(frame.persist(StorageLevel.MEMORY_AND_DISK))
        finally:
            spark.conf.set(CACHE_COMPRESSION, compressed)
        return frame

    # A fixed plan: the one big shuffle is the repartition by user, into the files; every other
    # shuffle is a small aggregation, as many partitions as files. Adaptive execution re-planned
    # each query stage at run time (driver work, generated code to compile) for nothing to
    # gain: 1M rows, 25.7 -> 23.3 CPU s in a warm JVM (docs/BENCHMARKS.md).
    session_conf = {key: spark.conf.get(key) for key in (ADAPTIVE, SHUFFLE_PARTITIONS)}
    spark.conf.set(ADAPTIVE, "false")
    spark.conf.set(SHUFFLE_PARTITIONS, str(config.files_per_partition))
    try:
        phase(2, "numbering, parsing and validating raw lines")
        numbered, input_lines = _numbered_lines(spark, paths)
        parsed = stage(
            "parsed",
            reduce(
                _union,
                [_parse_lines(numbered[e], config, e, headers[e]) for e in config.entity_names],
            ),
        )
        quarantine = parsed.where(F.col("reason").isNotNull()).select(
            "entity", "line_no", "raw_line", "reason"
        )
        reasons = _quarantine_reasons(quarantine, config)

        files = min(
            config.files_per_partition, max(1, sum(input_lines.values()) // MIN_LINES_PER_FILE)
        )
        spark.conf.set(SHUFFLE_PARTITIONS, str(files))
        phase(3, f"splitting users' rows in {files} groups (history mode {config.history_mode})")
        rows = persist(_split_rows(parsed, config, files))
        kept = rows.where(F.col("kept"))
        summary = _summarize(rows, kept, input_lines, reasons, config)

        phase(4, "vocabularies and buckets on the train split")
        train = kept.where(F.col("split") == "train")
        boundaries = _bucket_boundaries(train, config)
        counts = persist(_train_counts(train, boundaries, config).coalesce(files))
        vocab = persist(
            _categorical_vocab(counts, config).unionByName(
                _bucket_vocab(spark, counts, boundaries, config)
            )
        )
        sizes = _vocab_sizes(vocab)

        phase(5, f"encoding; liked-item sequences (seq_len {config.seq_len}); writing samples")
        encoded = _encode(kept, vocab, sizes, boundaries, config)
        # The file writer would sort by (entity, split) itself, and Spark would drop the sort
        # that gives each file its row order: let it keep one file per partition open instead.
        writers = spark.conf.get(CONCURRENT_WRITERS)
        spark.conf.set(CONCURRENT_WRITERS, str(len(SPLITS) * len(config.entities)))
        try:
            writes = {
                SAMPLES_TABLE: write_table(
                    _samples(encoded, config),
                    f"{output_dir}/{SAMPLES_TABLE}",
                    TABLES[SAMPLES_TABLE],
                    chosen_writer,
                    run_id,
                )
            }
        finally:
            spark.conf.set(CONCURRENT_WRITERS, writers)

        phase(6, f"writing vocab and quarantine; committing ({chosen_writer} writer) {output_dir}")
        for table, frame in ((VOCAB_TABLE, vocab.coalesce(1)), (QUARANTINE_TABLE, quarantine)):
            writes[table] = write_table(
                frame, f"{output_dir}/{table}", TABLES[table], chosen_writer, run_id
            )
        schema = _feature_schema(config, sizes, boundaries, input_dir, summary)
        # Each table commits atomically, but the three commits are not one transaction: the
        # schema file, written last, names the versions that belong together.
        versions = {t: w.commit(spark) for t, w in writes.items()}
        schema = dataclasses.replace(schema, table_versions=versions)
        summary["table_versions"] = versions
        summary["output_dir"] = output_dir
        summary["writer"] = chosen_writer
        summary["wall_s"] = round(time.monotonic() - started, 1)
        # The schema file goes last, once the tables it describes are committed.
        fs.write_text(f"{output_dir}/{SUMMARY_FILE}", json.dumps(summary, indent=2) + "\n")
        fs.write_text(f"{output_dir}/{SCHEMA_FILE}", json.dumps(schema.to_dict(), indent=2) + "\n")
    finally:
        for key, value in session_conf.items():
            spark.conf.set(key, value)
        for frame in cached:
            frame.unpersist()
        _discard_run(fs, output_dir, run_id)
        spark.sparkContext.setJobDescription(None)
    _log_summary(summary)
    return summary


def _discard_run(fs: HadoopFs, output_dir: str, run_id: str) -> None:
    """A run's staging dir, and the table files it wrote but did not commit."""
    for table in TABLES:
        discard_uncommitted(fs, f"{output_dir}/{table}", run_id)
    fs.delete(f"{output_dir}/{STAGING_PREFIX}{run_id}")


# --------------------------------------------------------------------------------------------
# Phase 1: inputs.
# --------------------------------------------------------------------------------------------


def _qualify(path: str | Path) -> str:
    """Absolute local path, or the URI unchanged (hdfs://, s3a://, file:/...)."""
    text = str(path)
    return text if "://" in text or text.startswith("file:") else os.path.abspath(text)


def _read_header(fs: HadoopFs, config: DataConfig, entity: str, path: str) -> list[str]:
    if not fs.is_file(path):
        raise InputError(f"entities.{entity}.file: raw file not found: {path}")
    first = fs.first_line(path)
    if first is None:
        raise InputError(f"entities.{entity}.file: {path} is empty (no header line)")
    header = [c.strip() for c in first.lstrip("\ufeff").split(",")]
    repeated = sorted({c for c in header if header.count(c) > 1})
    if repeated:
        raise InputError(f"{path}: header repeats column(s) {repeated}")
    config.check_header(entity, header)
    return header


# --------------------------------------------------------------------------------------------
# Phase 2: raw lines.
# --------------------------------------------------------------------------------------------


def _numbered_lines(
    spark: SparkSession, paths: dict[str, str]
) -> tuple[dict[str, DataFrame], dict[str, int]]:
    """Per entity, (line_no, raw_line) for every line of its file, the header being line 0;
    and its number of data lines.

    Exact file order without collecting or zipWithIndex: every input split (byte range
    starting at file_block_start) lies in one scan partition, and inside it
    monotonically_increasing_id counts up in file order. A line's number is therefore the
    number of lines in the earlier splits plus its position in its own split. The per-split
    line counts of all files are one small aggregation (one row per split).
    """
    lines = {
        e: spark.read.text(path).select(
            F.col("value").alias("raw_line"),
            F.col("_metadata.file_block_start").alias("block_start"),
            F.monotonically_increasing_id().alias("row_id"),
        )
        for e, path in paths.items()
    }
    blocks = reduce(
        _union,
        [
            frame.groupBy("block_start").agg(
                F.lit(e).alias("entity"),
                F.min("row_id").alias("first_row_id"),
                F.count(F.lit(1)).alias("lines"),
            )
            for e, frame in lines.items()
        ],
    ).collect()
    numbered, data_lines = {}, {}
    for e, frame in lines.items():
        offsets, before = [], 0
        for block in sorted((b for b in blocks if b.entity == e), key=lambda b: b.block_start):
            offsets.append((block.block_start, block.first_row_id, before))
            before += block.lines
        offsets_df = spark.createDataFrame(
            offsets, "block_start long, first_row_id long, lines_before long"
        )
        numbered[e] = frame.join(F.broadcast(offsets_df), "block_start").select(
            (F.col("row_id") - F.col("first_row_id") + F.col("lines_before")).alias("line_no"),
            "raw_line",
        )
        data_lines[e] = max(before - 1, 0)
    return numbered, data_lines


def _parse_lines(
    numbered: DataFrame, config: DataConfig, entity: str, header: list[str]
) -> DataFrame:
    """One row per data line: its number, quarantine reason (null if good), raw text (bad lines
    only: only the quarantine keeps it), a hash of the text (exact duplicates), fields.

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
        numbered.where(F.col("line_no") >= 1)
        .select(
            "line_no",
            "raw_line",
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

    def raw_value(feature: Feature) -> Column:
        column = feature.columns[entity]
        # An id is an integer: its canonical text is its value, so ' 7', '+7' and '007' are
        # the same user or item, as user_key says. Kept as a number where every entity's column
        # is an id: cheaper to shuffle and to look up.
        if _integer_id(feature, config):
            return F.col(f"id__{column}")
        if column in ids:
            return F.col(f"id__{column}").cast("string")
        # Missing (`\N` or empty) becomes null here, once, so later phases test only isNull.
        value = F.col(f"f__{column}")
        return F.when(~value.isin(*sorted(MISSING_TOKENS)), value)

    lines = lines.withColumn("reason", reason)
    return lines.select(
        F.lit(entity).alias("entity"),
        "line_no",
        "reason",
        # A string column must hold UTF-8: a line that is not is quarantined with its bad
        # bytes replaced by U+FFFD (line_no still points at the raw line).
        F.when(F.col("reason").isNotNull(), F.make_valid_utf8("raw_line")).alias("raw_line"),
        # Exact copies of a line have the same user, so (user, hash) finds them: a 64-bit hash
        # collides within one user's lines with odds of about n^2 / 2^65.
        F.xxhash64("raw_line").alias("line_hash"),
        F.col(f"id__{config.user_key}").alias("user_key"),
        label.try_cast("tinyint").alias("label"),
        *[raw_value(f).alias(_raw(f)) for f in config.features_of(entity)],
    )


def _integer_id(feature: Feature, config: DataConfig) -> bool:
    """The feature reads an integer id column (user_key, id_columns) in every entity."""
    ids = {config.user_key, *config.id_columns}
    return all(column in ids for column in feature.columns.values())


def _quarantine_reasons(quarantine: DataFrame, config: DataConfig) -> dict[str, dict[str, int]]:
    """Quarantined lines per entity and reason kind (the text before ':')."""
    reasons: dict[str, dict[str, int]] = {e: {} for e in config.entity_names}
    for r in (
        quarantine.groupBy("entity", F.substring_index("reason", ":", 1).alias("kind"))
        .count()
        .collect()
    ):
        reasons[r.entity][r.kind] = r["count"]
    return reasons


# --------------------------------------------------------------------------------------------
# Phase 3: one shuffle by user; split and like counts.
# --------------------------------------------------------------------------------------------


def _split_rows(parsed: DataFrame, config: DataConfig, files: int) -> DataFrame:
    """Every good line, shuffled into `files` groups of users, with its split and like count.

    The groups are the samples table's files (rows of one user stay in one file); every later
    step runs per user inside them. Per (entity, user), rows in line order; n rows, n_test =
    floor(test_fraction * n + 0.5) last rows are test, of n_fit = n - n_test the last
    floor(valid_fraction * n_fit + 0.5) are valid. `likes_before` counts the user's likes on
    earlier lines; `train_end` marks the last row of the train block, `fit_end` that of the
    train + valid block. An exact duplicate is `kept` = false when they are dropped (it stays
    here only to be counted).

    Output ordered by (user, entity, likes_before, line_no): line order, but also what the
    sequence window, whose frame is counted in likes, needs.
    """
    user = Window.partitionBy(*USER)
    running = user.orderBy("line_no").rowsBetween(Window.unboundedPreceding, Window.currentRow)
    rows = (
        parsed.where(F.col("reason").isNull())
        .drop("reason", "raw_line")
        .withColumn("user_hash", F.xxhash64("user_key"))
        .repartition(files, "user_hash")
    )
    if config.duplicates == "drop":
        copies = Window.partitionBy(*USER, "line_hash").orderBy("line_no")
        rows = rows.withColumn("kept", F.row_number().over(copies) == 1)
    else:
        rows = rows.withColumn("kept", F.lit(True))
    counted = F.col("kept").cast("long")
    rows = rows.select(
        "*",
        F.sum(counted).over(running).alias("rank"),
        F.sum(counted).over(user).alias("n"),
        (F.sum(counted * F.col("label")).over(running) - counted * F.col("label")).alias(
            "likes_before"
        ),
    )
    n_test = F.floor(F.col("n") * config.test_fraction + 0.5)
    n_fit = F.col("n") - n_test
    n_train = n_fit - F.floor(n_fit * config.valid_fraction + 0.5)
    split = (
        F.when(F.col("rank") <= n_train, "train")
        .when(F.col("rank") <= n_fit, "valid")
        .otherwise("test")
    )
    return rows.select(
        *USER,
        "line_no",
        "label",
        "kept",
        "line_hash",
        split.alias("split"),
        "likes_before",
        (F.col("kept") & (F.col("rank") == n_train)).alias("train_end"),
        (F.col("kept") & (F.col("rank") == n_fit)).alias("fit_end"),
        *[_raw(f) for f in config.features],
    ).sortWithinPartitions(*USER, "likes_before", "line_no")


def _summarize(
    rows: DataFrame,
    kept: DataFrame,
    input_lines: dict[str, int],
    reasons: dict[str, dict[str, int]],
    config: DataConfig,
) -> dict[str, Any]:
    """Counts per entity and split; raises if input lines != samples + quarantined + removed.

    Two jobs, each aggregating per user first, inside the shuffled groups (no further
    shuffle): one gives the users per set of entities (the overlap) with their rows, likes
    and users per (entity, split); the other the exact duplicates.
    """
    parts = [(e, s) for e in config.entity_names for s in SPLITS]

    def part(e: str, s: str) -> Column:
        return (F.col("entity") == e) & (F.col("split") == s)

    per_user = kept.groupBy("user_hash", "user_key").agg(
        *[F.max(F.col("entity") == e).alias(f"in__{e}") for e in config.entity_names],
        *[F.count(F.when(part(e, s), 1)).alias(f"rows__{e}__{s}") for e, s in parts],
        *[F.sum(F.when(part(e, s), F.col("label"))).alias(f"likes__{e}__{s}") for e, s in parts],
    )
    by_entities = (
        per_user.groupBy(*[f"in__{e}" for e in config.entity_names])
        .agg(
            F.count(F.lit(1)).alias("users"),
            *[
                F.sum(f"{k}__{e}__{s}").alias(f"{k}__{e}__{s}")
                for k in ("rows", "likes")
                for e, s in parts
            ],
            *[
                F.count(F.when(F.col(f"rows__{e}__{s}") > 0, 1)).alias(f"users__{e}__{s}")
                for e, s in parts
            ],
        )
        .collect()
    )
    overlap = {
        "+".join(sorted(e for e in config.entity_names if r[f"in__{e}"])): r.users
        for r in by_entities
    }

    def total(key: str) -> int:
        return sum(r[key] or 0 for r in by_entities)

    copies = rows.groupBy(*USER, "line_hash").agg(F.count(F.lit(1)).alias("copies"))
    duplicates = {
        r.entity: r.duplicates
        for r in copies.groupBy("entity")
        .agg(F.sum(F.col("copies") - 1).alias("duplicates"))
        .collect()
    }

    entities = {}
    for e in config.entity_names:
        quarantined = sum(reasons[e].values())
        found = duplicates.get(e) or 0
        removed = found if config.duplicates == "drop" else 0
        splits = {}
        for s in SPLITS:
            n_rows, likes = total(f"rows__{e}__{s}"), total(f"likes__{e}__{s}")
            splits[s] = {
                "rows": n_rows,
                "likes": likes,
                "like_rate": likes / n_rows if n_rows else None,
                "users": total(f"users__{e}__{s}"),
            }
        samples = sum(s["rows"] for s in splits.values())
        if input_lines[e] != samples + quarantined + removed:
            raise RuntimeError(
                f"{e}: {input_lines[e]} input lines != {samples} samples + {quarantined} "
                f"quarantined + {removed} removed duplicates"
            )
        entities[e] = {
            "input_lines": input_lines[e],
            "samples": samples,
            "quarantined": quarantined,
            "quarantine_reasons": reasons[e],
            "duplicates_found": found,
            "duplicates_removed": removed,
            "users": sum(n for key, n in overlap.items() if e in key.split("+")),
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


# --------------------------------------------------------------------------------------------
# Phase 4: vocabularies and buckets.
# --------------------------------------------------------------------------------------------


def _raw(feature: Feature) -> str:
    return f"raw__{feature.name}"


def _train_counts(
    train: DataFrame, boundaries: dict[str, list[float]], config: DataConfig
) -> DataFrame:
    """(feature, entity, value, count) over the train split, in one pass: every categorical
    raw value (`entity` null except for per-entity id spaces) and every bucketized feature's
    index (as text)."""
    entries = {}
    for entity in config.entity_names:
        items = []
        for f in config.features_of(entity):
            if f.kind == "categorical":
                value = F.col(_raw(f)).cast("string")
            else:
                value = _bucket_code(f, boundaries[f.name], F.col(_number(f))).cast("string")
            scope = F.lit(entity) if f.per_entity_ids else F.lit(None).cast("string")
            items.append(
                F.struct(
                    F.lit(f.name).alias("feature"), scope.alias("entity"), value.alias("value")
                )
            )
        entries[entity] = F.array(*items)
    per_row = reduce(
        lambda chosen, e: chosen.when(F.col("entity") == e, entries[e]),
        config.entity_names[1:],
        F.when(F.col("entity") == config.entity_names[0], entries[config.entity_names[0]]),
    )
    return (
        _with_numbers(train, _bucketized(config))
        .select(F.explode(per_row).alias("e"))
        .select("e.*")
        .where(F.col("value").isNotNull())
        .groupBy("feature", "entity", "value")
        .agg(F.count(F.lit(1)).alias("count"))
    )


def _categorical_vocab(counts: DataFrame, config: DataConfig) -> DataFrame:
    """(feature, entity, raw_value, index, count) from the train counts.

    Index 3.. by descending train count, then entity, then raw value. `entity` is null except
    for per-entity id spaces (Tenrec's item_id), where one vocabulary holds (entity, value).
    """
    features = [f.name for f in config.features if f.kind == "categorical"]
    order = Window.partitionBy("feature").orderBy(
        F.desc("count"), F.asc_nulls_first("entity"), "value"
    )
    return (
        counts.where(F.col("feature").isin(*features))
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
    counts: DataFrame,
    boundaries: dict[str, list[float]],
    config: DataConfig,
) -> DataFrame:
    """One vocab row per bucket: raw_value = the bucket's lower bound, count = train rows."""
    features = _bucketized(config)
    per_bucket = {}
    if features:
        names = [f.name for f in features]
        per_bucket = {
            (r.feature, int(r.value)): r["count"]
            for r in counts.where(F.col("feature").isin(*names)).collect()
        }
    rows = []
    for f in features:
        for i, lower in enumerate([float("-inf"), *boundaries[f.name]]):
            index = FIRST_INDEX + i
            rows.append((f.name, None, repr(lower), index, per_bucket.get((f.name, index), 0)))
    return spark.createDataFrame(
        rows, "feature string, entity string, raw_value string, index long, count long"
    )


def _vocab_sizes(vocab: DataFrame) -> dict[str, int]:
    """Embedding rows per feature (its largest index + 1): the encoding and the schema use it."""
    return {
        r.feature: r.size
        for r in vocab.groupBy("feature").agg((F.max("index") + 1).alias("size")).collect()
    }


# --------------------------------------------------------------------------------------------
# Phase 5: encoding and sequences.
# --------------------------------------------------------------------------------------------


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
        "likes_before",
        "train_end",
        "fit_end",
        *[f.name for f in config.features],
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
    bucket = F.aggregate(
        F.array(*[F.lit(b) for b in boundaries]).cast("array<double>"),
        F.lit(FIRST_INDEX).cast("long"),
        lambda count, b: count + (value >= b).cast("long"),
    )
    return _index(feature, F.when(value.isNull(), F.lit(OOV)).otherwise(bucket))


def _samples(encoded: DataFrame, config: DataConfig) -> DataFrame:
    """The samples table: every encoded row with seq_<entity> / seq_<entity>_len for every
    entity, per the data contract, in the order its file stores rows.

    Two windows over each user's rows as the shuffle left them (user, entity, likes before,
    line): nothing collects a user's history, and no array exceeds seq_len.
    - `before`: the items of the user's last seq_len likes in this entity on earlier lines
      (a frame counted in likes: the likes whose own likes_before lies in [k - seq_len, k - 1]
      for a row with k). It changes only after a like, so Spark computes it once per (user,
      like count). That is the history of a train row, and of every row in online mode.
    - `through`: `before` plus the row's own like: the history after the row. At the last row
      of the train block it is what a frozen valid row and every train or valid row of the
      other entities see; at the last train + valid row, what a frozen test row and every
      test row of the other entities see (one window per user).
    Each file's rows are then put in a pseudo-random order (_file_order), before the sequences
    are padded (so the sort moves the short arrays).
    """
    seq_len, item, entities = config.seq_len, config.item_feature, config.entity_names
    liked_items = F.when(F.col("label") == 1, F.col(item))
    in_likes = Window.partitionBy(*USER).orderBy("likes_before").rangeBetween(-seq_len, -1)
    rows = encoded.withColumn("before", F.collect_list(liked_items).over(in_likes))
    history = F.coalesce(F.col("before"), F.array().cast("array<bigint>"))
    with_own = F.concat(history, F.array(F.col(item)))
    through = F.when(
        F.col("label") == 1,
        F.slice(with_own, F.greatest(F.size(with_own) - (seq_len - 1), F.lit(1)), seq_len),
    ).otherwise(history)
    whole_user = Window.partitionBy("user_hash", "user_key")

    def at(end: str, entity: str) -> Column:
        """`through` at the user's row of `entity` that ends a block (null if none)."""
        return F.first(F.when((F.col("entity") == entity) & F.col(end), through), True).over(
            whole_user
        )

    rows = rows.select(
        "*",
        *[at("train_end", e).alias(f"train_items__{e}") for e in entities],
        *[at("fit_end", e).alias(f"fit_items__{e}") for e in entities],
    )
    if config.history_mode == "online":
        own = F.col("before")
    else:
        own = reduce(
            lambda chosen, e: chosen.when(
                F.col("entity") == e,
                F.when(F.col("split") == "valid", F.col(f"train_items__{e}")).otherwise(
                    F.col(f"fit_items__{e}")
                ),
            ),
            entities,
            F.when(F.col("split") == "train", F.col("before")),
        )
    rows = rows.withColumn("own_items", own).sortWithinPartitions(_file_order(config))
    sequences = []
    for entity in entities:
        # Another entity's likes up to the end of the blocks the row may look at: a test row
        # sees train + valid, a valid or train row the train block, so a valid row sees as old
        # a history as a test row does (docs/etl.md, "Sequences and history modes").
        items = (
            F.when(F.col("entity") == entity, F.col("own_items"))
            .when(F.col("split") == "test", F.col(f"fit_items__{entity}"))
            .otherwise(F.col(f"train_items__{entity}"))
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


# --------------------------------------------------------------------------------------------
# Phase 6: schema and summary log.
# --------------------------------------------------------------------------------------------


def _feature_schema(
    config: DataConfig,
    sizes: dict[str, int],
    boundaries: dict[str, list[float]],
    input_dir: str,
    summary: dict[str, Any],
) -> FeatureSchema:
    def vocab_size(f: Feature) -> int:
        if f.kind == "bucketized":
            return FIRST_INDEX + len(boundaries[f.name]) + 1
        return sizes.get(f.name, FIRST_INDEX)

    # As `_parse_lines` checks and canonicalises them.
    id_columns = {config.user_key, *config.id_columns}
    item = config.feature(config.item_feature)
    features = [
        SchemaFeature(
            name=f.name,
            group=f.group,
            kind=f.kind,
            vocab_size=vocab_size(f),
            entity=f.entity,
            boundaries=tuple(boundaries[f.name]) if f.kind == "bucketized" else (),
            integer_id=tuple(e for e in config.entity_names if f.columns.get(e) in id_columns),
        )
        for f in config.features
    ] + [
        SchemaFeature(
            name=f"seq_{e}",
            group="sequence",
            kind="sequence",
            vocab_size=vocab_size(item),
            entity=e,
            seq_len=config.seq_len,
            item_feature=item.name,
            length_column=f"seq_{e}_len",
        )
        for e in config.entity_names
    ]
    return FeatureSchema(
        source_entity=config.source_entity,
        target_entity=config.target_entity,
        entities=tuple(config.entity_names),
        seq_len=config.seq_len,
        history_mode=config.history_mode,
        item_feature=item.name,
        features=tuple(features),
        columns={c: c for c in ("entity", "split", "line_no", "user_key", "label")},
        dataset=config.name,
        raw_input={"dir": input_dir, "files": {e.name: e.file for e in config.entities}},
        counts={
            e: {s: v["splits"][s]["rows"] for s in SPLITS} for e, v in summary["entities"].items()
        },
        likes={
            e: {s: v["splits"][s]["likes"] for s in SPLITS} for e, v in summary["entities"].items()
        },
    )


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

    Cutting the lineage after parsing makes the shuffle, the quarantine and its counts read
    fixed data (line numbers are computed exactly once, every line parsed once).
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
