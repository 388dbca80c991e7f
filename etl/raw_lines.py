"""Phases 1-2 of the ETL (etl/build_samples.py): check the raw files' headers, then number,
parse and validate every raw line; a bad line gets its quarantine reason.

Apart because this is the only code that reads raw text: every quarantine reason is decided
here, and the later phases see only parsed columns (each feature's value under the name that
`_raw` gives it).
"""

from __future__ import annotations

from functools import reduce
from typing import Any

from pyspark.sql import Column, DataFrame, SparkSession
from pyspark.sql import functions as F
from pyspark.sql.types import StructType

from etl.config import DataConfig, Feature
from etl.storage import HadoopFs
from mkt.contract import MISSING_TOKENS


class InputError(ValueError):
    """A raw input file is missing or unreadable; the message names the file."""


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
        # Per split: lines before it minus its first row_id, looked up by the split's start in
        # a map literal (a few entries; no join, and no Python worker to build a frame).
        offsets, before = {}, 0
        for block in sorted((b for b in blocks if b.entity == e), key=lambda b: b.block_start):
            offsets[block.block_start] = before - block.first_row_id
            before += block.lines
        offset = (
            F.create_map(*(F.lit(v).cast("long") for kv in offsets.items() for v in kv))[
                F.col("block_start")
            ]
            if offsets
            else F.lit(0).cast("long")
        )
        numbered[e] = frame.select((F.col("row_id") + offset).alias("line_no"), "raw_line")
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
        # Nullable (a literal is not), as the tables' `entity` column was when these rows
        # were staged as Parquet, which reads back nullable: the tables keep their schema.
        F.when(F.col("line_no").isNotNull(), F.lit(entity)).alias("entity"),
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


def _raw(feature: Feature) -> str:
    return f"raw__{feature.name}"


def _union(a: DataFrame, b: DataFrame) -> DataFrame:
    return a.unionByName(b, allowMissingColumns=True)


def _local_frame(spark: SparkSession, rows: list[tuple[Any, ...]], schema: str) -> DataFrame:
    """A small frame of literal rows. `spark.createDataFrame` of a list reads it through Python
    worker processes, started for that alone; this builds it from literals in the JVM, written
    as one SQL expression: a py4j call per literal cost about a second of the driver's time
    for the 70 rows of the bucket vocabulary."""
    fields = StructType.fromDDL(schema).fields
    if not rows:
        return spark.range(0).select(*[F.lit(None).cast(f.dataType).alias(f.name) for f in fields])
    structs = (
        "named_struct("
        + ", ".join(
            f"'{f.name}', CAST({_sql_literal(v)} AS {f.dataType.simpleString()})"
            for v, f in zip(row, fields, strict=True)
        )
        + ")"
        for row in rows
    )
    return spark.range(1).select(F.expr(f"inline(array({', '.join(structs)}))"))


def _sql_literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, str):
        return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
    if isinstance(value, int):
        return f"{value}L"
    raise TypeError(f"no SQL literal for {value!r}")
