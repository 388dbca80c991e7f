"""The encoding's Spark side (etl/build_samples.py): the columns the Arrow passes
(etl/split_pass.py, etl/samples_pass.py) receive, and the bucket code the train counts use.

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
from etl.samples_pass import (
    NOT_NUMBERS,
    bucketized,
    integer_column,
    number_column,
    text_features,
)
from mkt.contract import FIRST_INDEX


def _pass_columns(config: DataConfig) -> list[Column]:
    """What the Arrow passes read of each parsed line's features, so that no pass parses text
    and little text crosses over (Spark hands text to Arrow at several times an integer's
    cost): an integer id as it is; a text value whose canonical integer text it is
    (`7`, not `07`) as that integer (integer_column), else as text; each bucketized value
    parsed as a number (null when missing or not a number), and one NOT_NUMBERS mask of the
    values that are there but not numbers."""
    columns = []
    texts = text_features(config)
    for f in config.features:
        if f.kind != "categorical":
            continue
        raw = F.col(_raw(f))
        if f not in texts:
            columns.append(raw)
            continue
        integer = raw.try_cast("long")
        canonical = integer.cast("string") == raw
        columns += [
            F.when(~canonical | integer.isNull(), raw).alias(_raw(f)),
            F.when(canonical, integer).alias(integer_column(f)),
        ]
    features = bucketized(config)
    if len(features) > 63:
        raise ValueError(f"{len(features)} bucketized features: NOT_NUMBERS holds at most 63")
    not_numbers = F.lit(0)
    for i, f in enumerate(features):
        raw = F.col(_raw(f))
        not_numbers = not_numbers.bitwiseOR(
            F.when(raw.isNotNull() & raw.try_cast("double").isNull(), F.lit(1 << i)).otherwise(0)
        )
    return [
        *columns,
        *[F.col(_raw(f)).try_cast("double").alias(number_column(f)) for f in features],
        not_numbers.cast("long").alias(NOT_NUMBERS),
    ]


def _bucket(boundaries: Sequence[float], value: Column) -> Column:
    """FIRST_INDEX + the number of boundaries <= value (sorted boundaries; NaN, which Spark
    orders above every number, is in the last bucket), as a comparison chain: Spark generates
    code for it, where a higher-order function runs interpreted."""
    bucket = F.when(F.lit(False), F.lit(0).cast("long"))
    for i, boundary in enumerate(boundaries):
        bucket = bucket.when(value < F.lit(float(boundary)), F.lit(FIRST_INDEX + i).cast("long"))
    return bucket.otherwise(F.lit(FIRST_INDEX + len(boundaries)).cast("long"))
