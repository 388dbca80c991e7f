"""The encoding's Spark side (etl/build_samples.py): the columns the Arrow passes
(etl/split_pass.py, etl/samples_pass.py) receive, the bucket code the train counts use, and
each samples file's row order.

Apart because these are the data contract's encoding rules: mkt/encoding.py states the same
rules for serving, and tests/test_serving.py holds them identical, so a change here (or in
etl/samples_pass.py) is a change there.
"""

from __future__ import annotations

from collections.abc import Sequence

from pyspark.sql import Column
from pyspark.sql import functions as F

from etl.config import DataConfig
from etl.raw_lines import _raw
from etl.samples_pass import ORDER_HASH, missing_column, number_column
from mkt.contract import FIRST_INDEX, SPLITS

# Fixes the pseudo-random order of the rows inside each samples file.
ROW_ORDER_SEED = 20240901


def _pass_columns(config: DataConfig) -> list[Column]:
    """What the Arrow passes read of each parsed line besides its raw categorical values: each
    bucketized value parsed as a number (null when missing or not a number) with a flag for a
    missing one, so no pass parses text, and the line's place in its samples file."""
    return [
        *[
            c
            for f in config.features
            if f.kind == "bucketized"
            for c in (
                F.col(_raw(f)).try_cast("double").alias(number_column(f)),
                F.col(_raw(f)).isNull().alias(missing_column(f)),
            )
        ],
        _order_hash(config).alias(ORDER_HASH),
    ]


def _bucket(boundaries: Sequence[float], value: Column) -> Column:
    """FIRST_INDEX + the number of boundaries <= value (sorted boundaries; NaN, which Spark
    orders above every number, is in the last bucket), as a comparison chain: Spark generates
    code for it, where a higher-order function runs interpreted."""
    bucket = F.when(F.lit(False), F.lit(0).cast("long"))
    for i, boundary in enumerate(boundaries):
        bucket = bucket.when(value < F.lit(float(boundary)), F.lit(FIRST_INDEX + i).cast("long"))
    return bucket.otherwise(F.lit(FIRST_INDEX + len(boundaries)).cast("long"))


def _order_hash(config: DataConfig) -> Column:
    """Each row's place in its samples file: the top bits of a hash of (ROW_ORDER_SEED,
    user_key, line_no), as a non-negative long. Each file's rows are sorted by it
    (etl/samples_pass.py), so a file mixes its users in an order fixed by the input. As many
    bits as the sort key of the (entity, split) partitions' files has always used, so the
    order is the one earlier versions of the job wrote."""
    partitions = len(config.entity_names) * len(SPLITS)
    shift = 63 - partitions.bit_length()
    return F.shiftrightunsigned(
        F.xxhash64(F.lit(ROW_ORDER_SEED), "user_key", "line_no"), 64 - shift
    )
