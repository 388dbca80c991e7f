"""Where the ETL reads and writes: Hadoop file-system helpers and the two Delta writers.

Paths go through Spark's Hadoop FileSystem, so the same code reads a local path here and an
hdfs:// or s3a:// path on a cluster.

Delta writers (docs/etl.md, "Delta writer"):
- ``spark``: delta-spark, when its jars are on the classpath (cluster:
  ``--packages io.delta:delta-spark_2.13:<version>``). Spark writes the table itself.
- ``rs``: delta-rs (the ``deltalake`` package). Spark has already written the table's rows as
  Parquet to a staging directory; the driver streams them into Delta record batch by record
  batch (:func:`staged_batches`), so the table is never collected into memory.
Both overwrite: a re-run commits a new table version atomically and older versions stay
readable (time travel) until someone vacuums them.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Literal

import pyarrow as pa
from pyspark.sql import SparkSession

Writer = Literal["auto", "spark", "rs"]
log = logging.getLogger("etl.storage")

DELTA_SPARK_CLASS = "io.delta.tables.DeltaTable"
DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"


class HadoopFs:
    """The few file operations the job needs, on whatever file system a path names."""

    def __init__(self, spark: SparkSession) -> None:
        self._jvm = spark.sparkContext._jvm
        self._conf = spark.sparkContext._jsc.hadoopConfiguration()

    def _resolve(self, path: str):
        jpath = self._jvm.org.apache.hadoop.fs.Path(path)
        fs = jpath.getFileSystem(self._conf)
        if fs.getScheme() == "file":
            # The checksummed local FS would leave a .crc file beside everything we write.
            fs = fs.getRawFileSystem()
        return jpath, fs

    def exists(self, path: str) -> bool:
        jpath, fs = self._resolve(path)
        return bool(fs.exists(jpath))

    def is_file(self, path: str) -> bool:
        jpath, fs = self._resolve(path)
        return bool(fs.exists(jpath)) and bool(fs.getFileStatus(jpath).isFile())

    def glob(self, pattern: str) -> list[str]:
        """Paths matching a glob pattern (Hadoop syntax: *, ?, [...])."""
        jpath, fs = self._resolve(pattern)
        return [str(status.getPath().toString()) for status in fs.globStatus(jpath) or []]

    def delete(self, path: str) -> None:
        jpath, fs = self._resolve(path)
        fs.delete(jpath, True)

    def write_text(self, path: str, text: str) -> None:
        """Write a small file so that readers see the old or the new content, never a part."""
        jpath, fs = self._resolve(path)
        tmp = self._jvm.org.apache.hadoop.fs.Path(path + ".tmp")
        out = fs.create(tmp, True)
        try:
            out.write(bytearray(text.encode("utf-8")))
        finally:
            out.close()
        # rename() overwrites on a local FS; HDFS and object stores refuse an existing target.
        if not fs.rename(tmp, jpath):
            fs.delete(jpath, False)
            if not fs.rename(tmp, jpath):
                raise OSError(f"could not move {path}.tmp to {path}")


class WriterError(RuntimeError):
    """`--writer spark` asked for, but this Spark session cannot write Delta itself."""


def resolve_writer(spark: SparkSession, writer: Writer) -> Literal["spark", "rs"]:
    """`auto` picks delta-spark when its classes load in this session and its SQL extension is
    configured (what `--packages io.delta:...` plus `--conf spark.sql.extensions=...` give;
    the catalog setting is not needed for writes by path), else delta-rs: jars on the
    classpath without the extension are a half-set-up cluster, and delta-rs writes the same
    table format."""
    loadable = bool(
        spark.sparkContext._jvm.org.apache.spark.util.Utils.classIsLoadable(DELTA_SPARK_CLASS)
    )
    extended = DELTA_EXTENSION in spark.conf.get("spark.sql.extensions", "")
    if writer == "auto":
        if loadable and not extended:
            log.info(
                "delta-spark is on the classpath but spark.sql.extensions lacks %s; "
                "writing with delta-rs",
                DELTA_EXTENSION,
            )
        return "spark" if loadable and extended else "rs"
    if writer == "spark" and not (loadable and extended):
        missing = (
            f"{DELTA_SPARK_CLASS} not found: add --packages io.delta:delta-spark_2.13:<version>"
            if not loadable
            else f"spark.sql.extensions lacks {DELTA_EXTENSION}: add --conf "
            f"spark.sql.extensions={DELTA_EXTENSION}"
        )
        raise WriterError(f"--writer spark: {missing}, or use --writer rs")
    return writer


def write_delta(
    spark: SparkSession,
    staging_path: str,
    table_path: str,
    partition_by: list[str],
    writer: Literal["spark", "rs"],
) -> int:
    """Overwrite the Delta table at table_path with the Parquet rows under staging_path.

    Returns the table version this commit created (the job is the table's only writer).
    """
    if writer == "spark":
        from delta.tables import DeltaTable as SparkDeltaTable

        (
            spark.read.parquet(staging_path)
            .write.format("delta")
            .mode("overwrite")
            .option("overwriteSchema", "true")
            .partitionBy(*partition_by)
            .save(table_path)
        )
        return int(SparkDeltaTable.forPath(spark, table_path).history(1).first()["version"])
    from deltalake import DeltaTable, write_deltalake

    write_deltalake(
        table_path,
        staged_batches(staging_path),
        mode="overwrite",
        schema_mode="overwrite",
        partition_by=partition_by or None,
    )
    return DeltaTable(table_path).version()


def staged_batches(staging_path: str, batch_rows: int = 65536) -> pa.RecordBatchReader:
    """The staged Parquet rows as a stream of record batches of at most batch_rows rows.

    Not pyarrow's dataset scanner: it decodes a whole row group at once, and Spark cuts row
    groups at ~128 MB of *encoded* data; the liked-item sequences compress so well that one
    row group decodes to gigabytes (the driver grew by ~0.8 GB per million samples).
    ParquetFile.iter_batches decodes batch_rows rows at a time.
    """
    import pyarrow.dataset as ds
    import pyarrow.parquet as pq

    # Files whose names start with "_" or "." (Spark's _SUCCESS) are skipped by pyarrow.
    dataset = ds.dataset(staging_path, format="parquet")

    def batches() -> Iterator[pa.RecordBatch]:
        for file in dataset.files:
            with dataset.filesystem.open_input_file(file) as handle:
                yield from pq.ParquetFile(handle).iter_batches(batch_size=batch_rows)

    return pa.RecordBatchReader.from_batches(dataset.schema, batches())
