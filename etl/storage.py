"""Where the ETL reads and writes: Hadoop file-system helpers and the two Delta writers.

Paths go through Spark's Hadoop FileSystem, so the same code reads a local path here and an
hdfs:// or s3a:// path on a cluster.

Delta writers (docs/etl.md, "Delta writer"):
- ``spark``: delta-spark, when its jars are on the classpath (cluster:
  ``--packages io.delta:delta-spark_2.13:<version>``). Spark writes and commits the table.
- ``rs``: the executors write the table's Parquet files in place, under
  ``TABLE/run-<run id>/`` in the usual ``key=value`` partition directories; the driver then
  commits one Delta log entry that adds exactly those files and removes the previous
  version's (delta-rs, ``create_table_with_add_actions`` in overwrite mode). No row passes
  through the driver: it reads the files' Parquet footers, for the statistics, and nothing
  else.
Both overwrite: a re-run commits a new table version atomically and older versions stay
readable (time travel) until someone vacuums them. Files written by a run that never committed
are invisible to every reader; :func:`discard_uncommitted` deletes them.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import unquote

import pyarrow as pa
from pyspark.sql import DataFrame, SparkSession

Writer = Literal["auto", "spark", "rs"]
log = logging.getLogger("etl.storage")

DELTA_SPARK_CLASS = "io.delta.tables.DeltaTable"
DELTA_EXTENSION = "io.delta.sql.DeltaSparkSessionExtension"
# Spark's directory name for a null partition value.
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
# Rows per Parquet row group at most. Readers (pyarrow, Ray Data) decode a whole row group at
# once, and a samples row with its two padded sequences is ~0.4 kB decoded: ~50 MB per group.
# Parquet's own limit is 128 MB *encoded*, which the sequences' zeros turn into millions of
# rows (delta-rs, the previous writer, cut groups at 1,048,576 rows).
ROW_GROUP_ROWS = 131_072
ROW_GROUP_ROWS_KEY = "parquet.block.row.count.limit"


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

    def first_line(self, path: str) -> str | None:
        """The file's first line (UTF-8; None if the file is empty), read without a Spark job."""
        jpath, fs = self._resolve(path)
        stream = fs.open(jpath)
        try:
            io = self._jvm.java.io
            return io.BufferedReader(io.InputStreamReader(stream, "UTF-8")).readLine()
        finally:
            stream.close()

    def glob(self, pattern: str) -> list[str]:
        """Paths matching a glob pattern (Hadoop syntax: *, ?, [...])."""
        jpath, fs = self._resolve(pattern)
        return [str(status.getPath().toString()) for status in fs.globStatus(jpath) or []]

    def mkdirs(self, path: str) -> None:
        jpath, fs = self._resolve(path)
        fs.mkdirs(jpath)

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


def run_dir(run_id: str) -> str:
    """The directory, relative to a table, that holds the files one run wrote with delta-rs."""
    return f"run-{run_id}"


@dataclass
class TableWrite:
    """One table's files, written by Spark; :meth:`commit` makes them the table's new version."""

    table_path: str
    writer: Literal["spark", "rs"]
    schema: pa.Schema
    partition_by: list[str]
    files_dir: str  # relative to table_path (rs); "" for delta-spark, which has committed

    def files(self) -> list[str]:
        """URIs of the Parquet files this write made: with delta-spark the table's version it
        committed, with delta-rs the run directory (not committed yet)."""
        if self.writer == "spark":
            from deltalake import DeltaTable

            return sorted(DeltaTable(self.table_path).file_uris())
        filesystem, root = _filesystem(self.table_path)
        return [
            f"{self.table_path}/{info.path[len(root) + 1 :]}"
            for info in _data_files(filesystem, f"{root}/{self.files_dir}")
        ]

    def commit(self, spark: SparkSession) -> int:
        """Commit (delta-rs) and return the table version this run created."""
        if self.writer == "spark":
            from delta.tables import DeltaTable as SparkDeltaTable

            history = SparkDeltaTable.forPath(spark, self.table_path).history(1)
            return int(history.first()["version"])
        from deltalake import DeltaTable
        from deltalake import Schema as DeltaSchema
        from deltalake.transaction import create_table_with_add_actions

        create_table_with_add_actions(
            self.table_path,
            DeltaSchema.from_arrow(self.schema),
            _add_actions(self.table_path, self.files_dir, self.partition_by),
            mode="overwrite",
            partition_by=self.partition_by or None,
        )
        return DeltaTable(self.table_path).version()


def write_table(
    frame: DataFrame,
    table_path: str,
    partition_by: list[str],
    writer: Literal["spark", "rs"],
    run_id: str,
) -> TableWrite:
    """Write frame's rows as the table's next version: one Parquet file per task and partition.

    delta-spark commits here; with delta-rs nothing is visible until :meth:`TableWrite.commit`.
    """
    schema = _arrow_schema(frame)
    if writer == "spark":
        (
            frame.write.option(ROW_GROUP_ROWS_KEY, ROW_GROUP_ROWS)
            .format("delta")
            .mode("overwrite")
            .option("overwriteSchema", "true")
            .partitionBy(*partition_by)
            .save(table_path)
        )
        return TableWrite(table_path, writer, schema, partition_by, "")
    files_dir = run_dir(run_id)
    (
        frame.write.option(ROW_GROUP_ROWS_KEY, ROW_GROUP_ROWS)
        .partitionBy(*partition_by)
        # No _SUCCESS marker inside a Delta table: the log says which files are the table.
        .option("mapreduce.fileoutputcommitter.marksuccessfuljobs", "false")
        .parquet(f"{table_path}/{files_dir}")
    )
    return TableWrite(table_path, writer, schema, partition_by, files_dir)


def discard_uncommitted(fs: HadoopFs, table_path: str, run_id: str) -> None:
    """Delete the files a run wrote under a table unless that table's latest version holds them.

    One writer per OUT_DIR: the run was the last to write, so if it did not commit, no version
    refers to its files; if it did, they are the latest version and stay.
    """
    files_dir = f"{table_path}/{run_dir(run_id)}"
    if not fs.exists(files_dir):
        return
    if fs.exists(f"{table_path}/_delta_log"):
        from deltalake import DeltaTable

        prefix = run_dir(run_id) + "/"
        if any(
            path.startswith(prefix)
            for path in DeltaTable(table_path)
            .get_add_actions(flatten=True)
            .column("path")
            .to_pylist()
        ):
            return
    log.info("removing %s, written by a run that did not commit it", files_dir)
    fs.delete(files_dir)


def _arrow_schema(frame: DataFrame) -> pa.Schema:
    from pyspark.sql.pandas.types import to_arrow_schema

    return to_arrow_schema(frame.schema)


def _add_actions(table_path: str, files_dir: str, partition_by: list[str]) -> list[Any]:
    """An add action per Parquet file under table_path/files_dir: size, partition values (from
    the key=value directories Spark wrote) and statistics read from the file's footer. In path
    order: readers list a table's files in its log's order, and Ray's seeded file shuffle
    permutes that list, so a rebuild of the same rows (new file names, a directory listed in
    another order) must log them in the same order for training to repeat."""
    import pyarrow.parquet as pq
    from deltalake.transaction import AddAction

    filesystem, root = _filesystem(table_path)
    actions = []
    for info in _data_files(filesystem, f"{root}/{files_dir}"):
        relative = info.path[len(root) + 1 :]
        values = dict(part.split("=", 1) for part in relative.split("/")[1:-1])
        partition_values = {
            key: None if values[key] == HIVE_NULL else unquote(values[key]) for key in partition_by
        }
        metadata = pq.read_metadata(info.path, filesystem=filesystem)
        actions.append(
            AddAction(
                path=relative,
                size=info.size,
                partition_values=partition_values,
                modification_time=int(info.mtime.timestamp() * 1000),
                data_change=True,
                stats=json.dumps(_stats(metadata)),
            )
        )
    return actions


def _filesystem(uri: str) -> tuple[Any, str]:
    from pyarrow import fs as pafs

    return pafs.FileSystem.from_uri(uri)


def _data_files(filesystem: Any, directory: str) -> list[Any]:
    """The data files under a directory, in path order (hidden and `_` files are not data)."""
    from pyarrow import fs as pafs

    infos = filesystem.get_file_info(pafs.FileSelector(directory, recursive=True))
    return sorted(
        (
            info
            for info in infos
            if info.type == pafs.FileType.File and not info.base_name.startswith(("_", "."))
        ),
        key=lambda info: info.path,
    )


def _stats(metadata: Any) -> dict[str, Any]:
    """Delta file statistics of the top-level scalar columns, from the row groups' statistics."""
    stats: dict[str, Any] = {
        "numRecords": metadata.num_rows,
        "minValues": {},
        "maxValues": {},
        "nullCount": {},
    }
    schema = metadata.schema.to_arrow_schema()
    for index in range(metadata.num_columns):
        path = metadata.schema.column(index).path
        if "." in path or pa.types.is_nested(schema.field(path).type):
            continue
        chunks = [
            metadata.row_group(g).column(index).statistics for g in range(metadata.num_row_groups)
        ]
        if not chunks or any(s is None for s in chunks):
            continue
        stats["nullCount"][path] = sum(s.null_count for s in chunks)
        bounded = [s for s in chunks if s.has_min_max]
        if bounded:
            stats["minValues"][path] = min(s.min for s in bounded)
            stats["maxValues"][path] = max(s.max for s in bounded)
    return stats
