"""Build MKT's training samples from two raw entity files (docs/etl.md, docs/data-contract.md).

    spark-submit etl/build_samples.py --config conf/data/tenrec.yaml --input RAW_DIR --output OUT_DIR

Writes under OUT_DIR the Delta tables ``samples`` (partitioned by entity and split), ``vocab``
and ``quarantine``, then ``feature_schema.json`` (everything the trainer needs to build its
embeddings) and ``etl_summary.json``. Python entry: :func:`build_samples`.

Phases (each logs one line), with the module that holds each; this one runs them in order:
 1. check the config and the raw files' headers (fails before anything is written):
    etl/raw_lines.py;
 2. number every raw line (line_no): etl/raw_lines.py;
 3. parse and validate every line (bad lines -> quarantine: etl/raw_lines.py), in the map
    tasks of the one shuffle by user (etl/split.py); then one Arrow pass per group of users
    splits each user's rows of an entity in line order (train / valid / test), counts for the
    summary (checked to reconcile) and the vocabularies, and stages the group's rows:
    etl/split_pass.py;
 4. vocabularies and bucket boundaries from the train split: etl/vocab.py; the vocab table's
    files;
 5. one Arrow pass per group: encode every feature as an index, liked-item sequences
    bounded by seq_len, the samples' files: etl/samples_pass.py;
 6. write the quarantine, commit the three Delta tables, then the schema file: here.
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
from collections import Counter
from functools import reduce
from pathlib import Path
from typing import Any, Literal

from pyspark import SparkConf, StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.pandas.types import from_arrow_schema

from etl.config import DataConfig, Feature, load_config
from etl.raw_lines import (
    InputError,
    _numbered_lines,
    _parse_lines,
    _read_header,
    _union,
)
from etl.samples_pass import SamplesPass, samples_schema
from etl.split import _log_summary, _split_groups, _summarize
from etl.split_pass import QUARANTINED, STAT
from etl.storage import (
    HadoopFs,
    TableWrite,
    Writer,
    WriterError,
    discard_uncommitted,
    resolve_writer,
    run_dir,
    write_table,
)
from etl.vocab import (
    _bucket_boundaries,
    _bucket_vocab,
    _categorical_vocab,
    _count_summary,
    _train_counts,
)
from mkt.contract import (
    ACTIVITY_BOUNDARIES,
    ACTIVITY_COUNTS,
    ACTIVITY_RELATIONS,
    FIRST_INDEX,
    QUARANTINE_TABLE,
    SAMPLES_TABLE,
    SCHEMA_FILE,
    SPLITS,
    VOCAB_TABLE,
    ConfigError,
    activity_feature,
)
from mkt.schema import Feature as SchemaFeature
from mkt.schema import FeatureSchema

__all__ = ["InputError", "build_samples", "main"]

log = logging.getLogger("etl.build_samples")

SUMMARY_FILE = "etl_summary.json"
# Each table of OUT_DIR with its partition columns.
TABLES = {SAMPLES_TABLE: ["entity", "split"], VOCAB_TABLE: [], QUARANTINE_TABLE: []}
# The directory of a run in progress (build_samples): its marker, and the split pass's staged
# groups (etl/split_pass.py).
STAGING_PREFIX = "_staging-"
QUARANTINE_COLUMNS = ["entity", "line_no", "raw_line", "reason"]
# A tiny input gets fewer samples files than files_per_partition: at most one per this many
# input lines, so a few hundred lines are not cut into a dozen near-empty files.
MIN_LINES_PER_FILE = 256
CACHE_COMPRESSION = "spark.sql.inMemoryColumnarStorage.compressed"
CONCURRENT_WRITERS = "spark.sql.maxConcurrentOutputFileWriters"
ADAPTIVE = "spark.sql.adaptive.enabled"
SHUFFLE_PARTITIONS = "spark.sql.shuffle.partitions"
MIN_SPLITS = "spark.sql.files.minPartitionNum"
# Rows per Arrow batch between the JVM and the passes (Spark's default: 10,000).
ARROW_BATCH = "spark.sql.execution.arrow.maxRecordsPerBatch"
ARROW_BATCH_ROWS = 100_000
# Input splits per task slot, unless the session sets MIN_SPLITS (docs/etl.md, "Command").
SPLITS_PER_SLOT = 4
DATAFRAME_DEBUGGING = "spark.python.sql.dataFrameDebugging.enabled"
# Off-heap execution memory of a local run (docs/etl.md, "Command"); the heap keeps the cache.
OFF_HEAP_SIZE = "2g"


def build_samples(
    spark: SparkSession,
    config_path: str | Path,
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    history_mode: str | None = None,
    seq_len: int | None = None,
    duplicates: str | None = None,
    activity: bool | None = None,
    writer: Writer = "auto",
) -> dict[str, Any]:
    """Run the whole job with the caller's SparkSession; return the summary dict.

    Keyword options override the config file. Raises ConfigError / InputError, before writing
    anything, when the config, a raw file or one of its columns is wrong.
    """
    started = time.monotonic()
    config = load_config(config_path).with_overrides(
        history_mode=history_mode, seq_len=seq_len, duplicates=duplicates, activity=activity
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

    # A run killed before its `finally` leaves its marker dir behind, and maybe table files it
    # never committed; a job owns its OUT_DIR (one writer at a time), so they are garbage.
    for leftover in fs.glob(f"{output_dir}/{STAGING_PREFIX}*"):
        log.info("removing %s and its uncommitted files, left by an interrupted run", leftover)
        _discard_run(fs, output_dir, leftover.rsplit(STAGING_PREFIX, 1)[1])
    run_id = uuid.uuid4().hex[:12]
    # The run's directory: the split pass stages the groups' rows in it, and a run killed
    # before its `finally` leaves it behind, so the next run finds there which table files
    # nobody committed.
    fs.mkdirs(f"{output_dir}/{STAGING_PREFIX}{run_id}")
    cached: list[DataFrame] = []

    def persist(frame: DataFrame) -> DataFrame:
        # The split pass's output (the quarantine, counts, train values) is read by several
        # jobs; the pass runs once. Uncompressed: choosing and applying a compression scheme
        # per column cost more CPU than it saved when the cache held the whole rows (1M rows:
        # 8.6 CPU s, 5.6 s without); past its share of the heap the cache spills to disk.
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
    session_conf = {
        key: spark.conf.get(key, None)
        for key in (ADAPTIVE, SHUFFLE_PARTITIONS, MIN_SPLITS, ARROW_BATCH)
    }
    spark.conf.set(ADAPTIVE, "false")
    # The passes read a whole group before they start: larger batches cost the JVM less
    # per row to hand over (5M raw rows: 1.1 s less wall, docs/BENCHMARKS.md).
    spark.conf.set(ARROW_BATCH, str(ARROW_BATCH_ROWS))
    spark.conf.set(SHUFFLE_PARTITIONS, str(config.files_per_partition))
    # Spark cuts the raw files into one split per task slot (at most 128 MB): 5M raw rows
    # gave 3 parse tasks on 2 slots, one slot idle for the last. Smaller splits share the
    # parsing out evenly; a split costs one file open and a line count.
    if session_conf[MIN_SPLITS] is None:
        slots = spark.sparkContext.defaultParallelism
        spark.conf.set(MIN_SPLITS, str(SPLITS_PER_SLOT * slots))
    try:
        phase(2, "numbering raw lines")
        numbered, input_lines = _numbered_lines(spark, paths)
        parsed = reduce(
            _union, [_parse_lines(numbered[e], config, e, headers[e]) for e in config.entity_names]
        )
        files = min(
            config.files_per_partition, max(1, sum(input_lines.values()) // MIN_LINES_PER_FILE)
        )
        spark.conf.set(SHUFFLE_PARTITIONS, str(files))
        phase(
            3,
            f"parsing and validating lines; splitting users' rows in {files} groups "
            f"(history mode {config.history_mode}); bucket boundaries",
        )
        # Lines are parsed in the shuffle's map tasks, quarantined ones included; the split
        # pass stages each group's kept rows in the run's directory for phase 5, and what the
        # driver's aggregations read of it stays in the cache (docs/etl.md).
        staging_uri = f"{output_dir}/{STAGING_PREFIX}{run_id}"
        groups = persist(_split_groups(parsed, config, files, staging_uri))
        # One job: the split pass, its counts for the summary and the bucket boundaries.
        boundaries, row = _bucket_boundaries(
            groups,
            config,
            F.collect_list(F.when(F.col("kind") == STAT, F.struct("name", "count"))).alias("stats"),
        )
        stats: Counter[str] = Counter()
        for entry in row.stats:
            stats[entry.name] += entry["count"]
        summary = _summarize(stats, input_lines, config)

        phase(4, "vocabularies on the train split")
        counts = persist(_train_counts(groups, boundaries, config).coalesce(files))
        # One job for all the driver needs of the counts.
        counted = _count_summary(counts, config)
        sizes = counted.sizes
        summary["rare_ids"] = counted.rare_ids
        vocab = _categorical_vocab(counts, config).unionByName(
            _bucket_vocab(spark, counted.per_bucket, boundaries, config)
        )
        # Written first: each task of phase 5 reads its files. A file per feature's partition
        # (each numbered in its own task), not one: one task did all the numbering.
        writes = {
            VOCAB_TABLE: write_table(
                vocab, f"{output_dir}/{VOCAB_TABLE}", [], chosen_writer, run_id
            )
        }

        phase(5, f"encoding; liked-item sequences (seq_len {config.seq_len}); writing samples")
        writes[SAMPLES_TABLE] = _write_samples(
            spark.range(0, files, 1, files),
            SamplesPass(
                config,
                boundaries,
                tuple(writes[VOCAB_TABLE].files()),
                samples_schema(config),
                staging_uri,
                files_uri=None,
                run_id=run_id,
            ),
            f"{output_dir}/{SAMPLES_TABLE}",
            sum(e["samples"] for e in summary["entities"].values()),
            chosen_writer,
            run_id,
        )

        phase(6, f"writing quarantine; committing ({chosen_writer} writer) {output_dir}")
        # One quarantine file in line order.
        quarantined = (
            groups.where(F.col("kind") == QUARANTINED)
            .select(*QUARANTINE_COLUMNS)
            .coalesce(1)
            .sortWithinPartitions("entity", "line_no")
        )
        writes[QUARANTINE_TABLE] = write_table(
            quarantined, f"{output_dir}/{QUARANTINE_TABLE}", [], chosen_writer, run_id
        )
        schema = _feature_schema(config, sizes, boundaries, input_dir, summary)
        # Each table commits atomically, but the three commits are not one transaction: the
        # schema file, written last, names the versions that belong together.
        versions = {t: writes[t].commit(spark) for t in TABLES}
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
            if value is None:
                spark.conf.unset(key)
            else:
                spark.conf.set(key, value)
        for frame in cached:
            frame.unpersist()
        _discard_run(fs, output_dir, run_id)
        spark.sparkContext.setJobDescription(None)
    _log_summary(summary)
    return summary


def _write_samples(
    groups: DataFrame,
    samples: SamplesPass,
    table_path: str,
    expected_rows: int,
    writer: Literal["spark", "rs"],
    run_id: str,
) -> TableWrite:
    """Phase 5: the Arrow pass over each group of users (`groups`: one row per group, its
    number, in a partition of its own). With delta-rs its tasks write the files under the
    table's run directory themselves and return their names; delta-spark writes the rows they
    return. Raises unless the files hold every sample row."""
    partition_by = TABLES[SAMPLES_TABLE]
    if writer == "spark":
        frame = groups.mapInArrow(samples, from_arrow_schema(samples.schema))
        # The file writer would sort by (entity, split) itself and drop the rows' file order:
        # let it keep one file per partition open instead.
        spark = groups.sparkSession
        writers = spark.conf.get(CONCURRENT_WRITERS)
        spark.conf.set(CONCURRENT_WRITERS, str(len(SPLITS) * len(samples.config.entities)))
        try:
            return write_table(frame, table_path, partition_by, writer, run_id)
        finally:
            spark.conf.set(CONCURRENT_WRITERS, writers)
    files_dir = run_dir(run_id)
    samples = dataclasses.replace(samples, files_uri=f"{table_path}/{files_dir}")
    written = groups.mapInArrow(samples, "path string, rows long").collect()
    if sum(w.rows for w in written) != expected_rows:
        raise RuntimeError(
            f"{table_path}: {len(written)} files hold {sum(w.rows for w in written)} rows, "
            f"expected {expected_rows} samples"
        )
    return TableWrite(table_path, writer, samples.schema, partition_by, files_dir)


def _discard_run(fs: HadoopFs, output_dir: str, run_id: str) -> None:
    """A run's marker dir, and the table files it wrote but did not commit."""
    for table in TABLES:
        discard_uncommitted(fs, f"{output_dir}/{table}", run_id)
    fs.delete(f"{output_dir}/{STAGING_PREFIX}{run_id}")


# --------------------------------------------------------------------------------------------
# Phase 6: the feature schema (the summary log: etl/split.py).
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
        # A vocabulary left empty (no train rows, or none reaching min_count) still gets one
        # row past the reserved ones: an embedding table of the reserved rows alone is refused.
        return max(sizes.get(f.name, FIRST_INDEX), FIRST_INDEX + 1)

    # As `_parse_lines` (etl/raw_lines.py) checks and canonicalises them.
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
            min_count=f.min_count,
        )
        for f in config.features
    ]
    if config.activity:
        features += [
            SchemaFeature(
                name=activity_feature(count, relation),
                group="user",
                kind="bucketized",
                vocab_size=FIRST_INDEX + len(ACTIVITY_BOUNDARIES) + 1,
                boundaries=tuple(float(b) for b in ACTIVITY_BOUNDARIES),
            )
            for relation in ACTIVITY_RELATIONS
            for count in ACTIVITY_COUNTS
        ]
    features += [
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


# --------------------------------------------------------------------------------------------
# Plumbing.
# --------------------------------------------------------------------------------------------


def _qualify(path: str | Path) -> str:
    """Absolute local path, or the URI unchanged (hdfs://, s3a://, file:/...)."""
    text = str(path)
    return text if "://" in text or text.startswith("file:") else os.path.abspath(text)


def _spark_session() -> SparkSession:
    """The script's session: spark-submit's --master/--conf win; local runs bind to 127.0.0.1."""
    submitted = SparkConf()
    builder = SparkSession.builder.appName("mkt-build-samples")
    master = submitted.get("spark.master", "local[*]")
    if not submitted.contains("spark.master"):
        builder = builder.master(master)
    # PySpark's DataFrame debugging sends every column function's Python call site to the JVM
    # (only for the messages of analysis errors): 22.6k py4j round trips per run instead of
    # 10.0k, about 2.5 s of the driver's time in a fresh JVM while the executors wait
    # (docs/BENCHMARKS.md). Opt in with --conf spark.python.sql.dataFrameDebugging.enabled=true.
    if not submitted.contains(DATAFRAME_DEBUGGING):
        builder = builder.config(DATAFRAME_DEBUGGING, "false")
    if master.startswith("local"):
        local_defaults = {
            "spark.driver.host": "127.0.0.1",
            "spark.driver.bindAddress": "127.0.0.1",
            # The UI would listen on every interface; opt in with --conf spark.ui.enabled=true.
            "spark.ui.enabled": "false",
            # Sorts, windows' spill buffers and aggregations take their pages off the heap:
            # on it, every young collection copied them while they lived (5M rows: GC pauses
            # 9.9 s on average, 5.6-13.6, -> 5.5, 4.5-6.3; docs/BENCHMARKS.md).
            "spark.memory.offHeap.enabled": "true",
            "spark.memory.offHeap.size": OFF_HEAP_SIZE,
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
        "--activity",
        action="store_true",
        default=None,
        help="write the activity features (override config sequence.activity)",
    )
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
            activity=args.activity,
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
