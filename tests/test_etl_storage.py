"""etl/storage.py's delta-rs path: Spark writes the files, the driver commits them (real Spark,
real Delta tables)."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable
from pyspark.sql import functions as F

from etl.storage import ROW_GROUP_ROWS, run_dir, write_table

pytestmark = pytest.mark.slow


def test_write_then_commit_overwrites_with_bounded_row_groups(spark, tmp_path: Path) -> None:
    table = str(tmp_path / "t")
    rows = 3 * ROW_GROUP_ROWS + 5
    frame = (
        spark.range(rows)
        .select(F.col("id"), (F.col("id") % 2).cast("string").alias("part"))
        .coalesce(1)
    )

    first = write_table(frame, table, ["part"], "rs", "aaaaaaaaaaaa")
    # Written but not committed: no table yet, the files are where the commit will find them.
    assert not (tmp_path / "t" / "_delta_log").exists()
    assert first.commit(spark) == 0
    second = write_table(frame.where(F.col("id") < 10), table, ["part"], "rs", "bbbbbbbbbbbb")
    assert second.commit(spark) == 1

    latest = DeltaTable(table)
    assert latest.metadata().partition_columns == ["part"]
    assert sorted(latest.to_pyarrow_table().column("id").to_pylist()) == list(range(10))
    old = DeltaTable(table, version=0)
    assert old.to_pyarrow_table().num_rows == rows  # time travel: the first version's files stay
    actions = pa.table(old.get_add_actions(flatten=True)).to_pylist()
    assert {a["partition.part"] for a in actions} == {"0", "1"}
    for action in actions:
        assert action["path"].startswith(run_dir("aaaaaaaaaaaa") + "/part=")
        metadata = pq.ParquetFile(tmp_path / "t" / action["path"]).metadata
        assert action["num_records"] == metadata.num_rows
        assert action["min.id"] >= 0 and action["max.id"] < rows
        sizes = [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]
        assert max(sizes) <= ROW_GROUP_ROWS and len(sizes) > 1
