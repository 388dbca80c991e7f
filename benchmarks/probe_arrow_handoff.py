"""What handing the ETL's rows to Python workers costs: a go / no-go for an Arrow phase 5.

    python benchmarks/probe_arrow_handoff.py --input RAW_DIR [--master local[2]] [--rounds 2]

Issue 14 asks for 100k raw rows/s at 5M rows on `local[2]`. One way considered was to replace
phase 5's Spark operators (the encoding joins, the sequence window, the sort and Spark's
row-by-row Parquet writer) by one `mapInArrow` pass per partition: numpy for the encoding and
the sequences, pyarrow writing the files. Its floor is the hand-off itself: Spark converting
every row to Arrow, the Python worker reading it. This runs phases 2 and 3 as
etl/build_samples.py did when it was measured (commit ab3d851; conf/data/tenrec.yaml: the raw
lines parsed and staged as Parquet, then the split rows, 23 columns, cached; the job stages
nothing since branch etl14, and its cached rows carry the quarantined lines too), and then, timed on those cached rows, `rounds` times
each: the cached rows to Spark's `noop` sink (reading the cache alone), and the same rows
through `mapInArrow` with one count per Arrow batch back (the hand-off alone). Wall time and
the machine's busy CPU seconds (all processes, from /proc/stat: run it on an idle machine).
The job's session settings that matter here are the job's own (off-heap execution memory,
adaptive execution off, as many shuffle partitions as files).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from functools import reduce
from pathlib import Path

from pyspark import StorageLevel
from pyspark.sql import SparkSession
from pyspark.sql import functions as F

from etl.build_samples import CACHE_COMPRESSION, OFF_HEAP_SIZE
from etl.config import load_config
from etl.raw_lines import _numbered_lines, _parse_lines, _read_header, _union
from etl.split import _split_rows
from etl.storage import HadoopFs

REPO = Path(__file__).resolve().parents[1]


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has spent busy since boot."""
    with open("/proc/stat") as stat:
        ticks = [int(v) for v in stat.readline().split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def count_batches(batches):
    import pyarrow as pa

    for batch in batches:
        yield pa.RecordBatch.from_pydict({"rows": [batch.num_rows]})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--input", required=True, type=Path, help="RAW_DIR of Tenrec-format CSVs")
    parser.add_argument("--master", default="local[2]")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/probe_arrow_handoff"))
    args = parser.parse_args(argv)
    # The Python workers must import pyarrow: this interpreter's environment.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    config = load_config(REPO / "conf" / "data" / "tenrec.yaml")
    spark = (
        SparkSession.builder.master(args.master)
        .appName("probe-arrow-handoff")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.memory", "4g")
        .config("spark.memory.offHeap.enabled", "true")
        .config("spark.memory.offHeap.size", OFF_HEAP_SIZE)
        .config("spark.sql.adaptive.enabled", "false")
        .config("spark.sql.shuffle.partitions", str(config.files_per_partition))
        .config(CACHE_COMPRESSION, "false")
        .getOrCreate()
    )
    spark.sparkContext.setLogLevel("ERROR")
    fs = HadoopFs(spark)
    paths = {e.name: str(args.input.resolve() / e.file) for e in config.entities}
    headers = {e: _read_header(fs, config, e, paths[e]) for e in config.entity_names}
    numbered, _ = _numbered_lines(spark, paths)
    frames = [_parse_lines(numbered[e], config, e, headers[e]) for e in config.entity_names]
    staged = str(args.work_dir / "parsed")
    started = time.monotonic()
    reduce(_union, frames).write.mode("overwrite").parquet(staged)
    print(f"phase 2 (parse, stage): {time.monotonic() - started:.1f} s", flush=True)
    rows = _split_rows(spark.read.parquet(staged), config, config.files_per_partition)
    rows = rows.persist(StorageLevel.MEMORY_AND_DISK)
    started = time.monotonic()
    count = rows.count()
    print(
        f"phase 3 (split, cache): {time.monotonic() - started:.1f} s, {count:,} rows, "
        f"{len(rows.columns)} columns",
        flush=True,
    )

    passes = {
        "cached rows -> noop sink": lambda: rows.write.format("noop").mode("overwrite").save(),
        "cached rows -> mapInArrow (a count per batch back)": lambda: (
            rows.mapInArrow(count_batches, "rows long").agg(F.sum("rows")).collect()
        ),
    }
    print("\n| pass | round | wall s | machine CPU s |\n|---|---|---|---|")
    for round_ in range(1, args.rounds + 1):
        for name, run in passes.items():
            cpu, started = busy_cpu_s(), time.monotonic()
            run()
            wall, used = time.monotonic() - started, busy_cpu_s() - cpu
            print(f"| {name} | {round_} | {wall:.1f} | {used:.1f} |", flush=True)
    spark.stop()


if __name__ == "__main__":
    main()
