"""benchmarks/duckdb_samples.py (the benchmark's reference) gives the Spark job's tables, row for row.

Small generated Tenrec-format data with planted bad, padded and odd lines goes through both;
samples (every column, sequences included), vocab and quarantine must be equal. At this size
Spark's percentile_approx is exact, so the bucket boundaries agree too (docs/BENCHMARKS.md
compares the two at 1M-20M rows).
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pytest
from deltalake import DeltaTable

from benchmarks.duckdb_samples import build_samples_duckdb
from etl.build_samples import build_samples
from jobs.generate_tenrec import generate

pytestmark = pytest.mark.slow

CONFIG = Path(__file__).resolve().parents[1] / "conf" / "data" / "tenrec.yaml"
KEYS = {"samples": ["entity", "line_no"], "vocab": ["feature", "index"]}
KEYS["quarantine"] = KEYS["samples"]
PLANTED = {
    "QK-video.csv": [
        "1,2,3",
        "",
        "abc,5,0,0,0,0,3,0,1,2",
        ",5,0,0,0,0,3,0,1,2",
        "7,5,0,0,2,0,3,0,1,2",
        "7,x9,0,0,0,0,3,0,1,2",
        "99999999999999999999,5,0,0,0,0,3,0,1,2",
        " 7 ,+5,0,0,1,0,3,0,1,2",  # padded and signed ids: user 7, item 5
        "-3,005,0,0,1,0,\\N,0,1,2",  # a negative user id is an id
    ],
    "QK-article.csv": [
        "3,4,1,1,2,10,5,1,0,50,7,5,11,2,30,1,40,0,0,0,0,extra",
        "3,4,1,1,2,10,5,1,0,50,7,5,11,2,30,1,40,0,yes,0,0",
        "3,4,1,1,2,,5,1,0,50,abc,5,11,2,30,1,40,0,1,0,0",  # missing and non-numeric values
    ],
}


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    raw = tmp_path_factory.mktemp("duckdb_raw")
    generate(raw, num_users=40, seed=11)
    for file, planted in PLANTED.items():
        header, *lines = (raw / file).read_text().rstrip("\n").split("\n")
        step = len(lines) // (len(planted) + 1)
        for i, line in reversed(list(enumerate(planted))):
            lines.insert((i + 1) * step, line)
        (raw / file).write_text("\n".join([header, *lines]) + "\n")
    return raw


def _comparable(frame: pd.DataFrame, table: str, columns: list[str]) -> pd.DataFrame:
    frame = frame[columns].sort_values(KEYS[table]).reset_index(drop=True)
    for column in columns:
        if column.startswith("seq_") and not column.endswith("_len"):
            frame[column] = frame[column].map(tuple)
    return frame


def test_duckdb_reference_equals_spark_row_for_row(spark, raw: Path, tmp_path: Path) -> None:
    # With the activity features (off in the config), so that they are compared too.
    spark_summary = build_samples(spark, CONFIG, raw, tmp_path / "spark", activity=True)
    duck_summary = build_samples_duckdb(CONFIG, raw, tmp_path / "duckdb", activity=True, threads=2)

    paths = {
        "samples": f"read_parquet('{tmp_path}/duckdb/samples/*/*/*.parquet', hive_partitioning = true)",
        "vocab": f"'{tmp_path}/duckdb/vocab.parquet'",
        "quarantine": f"'{tmp_path}/duckdb/quarantine.parquet'",
    }
    for table, path in paths.items():
        expected = DeltaTable(str(tmp_path / "spark" / table)).to_pyarrow_table().to_pandas()
        got = duckdb.sql(f"SELECT * FROM {path}").df()
        columns = list(expected.columns)
        assert sorted(got.columns) == sorted(columns), table
        pd.testing.assert_frame_equal(
            _comparable(got, table, columns),
            _comparable(expected, table, columns),
            check_dtype=False,  # hive partition values come back as categories
            obj=table,
        )
    for entity, counts in duck_summary["entities"].items():
        spark_counts = spark_summary["entities"][entity]
        assert counts["quarantined"] == spark_counts["quarantined"] > 0
        assert counts["splits"] == {s: v["rows"] for s, v in spark_counts["splits"].items()}
    # All planted lines but the three valid ones are quarantined.
    quarantined = sum(s["quarantined"] for s in duck_summary["entities"].values())
    assert quarantined == sum(len(lines) for lines in PLANTED.values()) - 3
