"""etl/spark_hash.py gives Spark's own xxhash64: the users' groups and the samples files' row
order that the Arrow passes compute depend on it."""

from __future__ import annotations

import numpy as np
from pyspark.sql import functions as F

from etl import spark_hash
from etl.samples_pass import ROW_ORDER_SEED


def test_xxhash64_of_longs_and_an_int_literal_matches_spark(spark) -> None:
    rng = np.random.default_rng(7)
    keys = [int(k) for k in rng.integers(-(2**63), 2**63 - 1, size=200, dtype=np.int64)]
    keys += [0, 1, -1, 2**63 - 1, -(2**63), None]
    lines = [int(n) for n in rng.integers(0, 10**9, size=len(keys))]
    frame = spark.createDataFrame(list(zip(keys, lines, strict=True)), "key long, line long")
    expected = frame.select(
        F.xxhash64("key").alias("user"),
        F.xxhash64(F.lit(ROW_ORDER_SEED), "key", "line").alias("row"),
    ).collect()

    valid = np.array([k is not None for k in keys])
    key = np.array([0 if k is None else k for k in keys], np.int64)
    seed = np.full(len(keys), spark_hash.SEED)
    user = spark_hash.signed(spark_hash.hash_long(key, seed, valid))
    row = spark_hash.hash_int(ROW_ORDER_SEED, seed)
    row = spark_hash.signed(
        spark_hash.hash_long(np.array(lines, np.int64), spark_hash.hash_long(key, row, valid))
    )
    assert user.tolist() == [r.user for r in expected]
    assert row.tolist() == [r.row for r in expected]
    assert expected[-1].user == 42  # a null leaves the seed
