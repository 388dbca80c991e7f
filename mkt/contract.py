"""The data contract: the names and reserved values that etl/, mkt/, train/ and jobs/ agree on
(docs/data-contract.md has the whole contract). Standard library only, so that the Spark job,
the Ray workers and the serving encoder all import this one copy.
"""

from __future__ import annotations

# Reserved embedding indices of every categorical and bucketized feature; the first value
# seen in training gets FIRST_INDEX.
PAD = 0  # padding of a sequence, or a feature of another entity ("not applicable")
MISSING = 1  # the raw value was missing (Tenrec's `\N`, an empty field)
OOV = 2  # a value never seen in the train split
FIRST_INDEX = 3
RESERVED_INDICES = {"padding": PAD, "missing": MISSING, "oov": OOV}

# Raw values read as missing (index MISSING), after trimming: Tenrec writes `\N` (MySQL's
# export); an empty field is missing too.
RAW_MISSING = "\\N"
MISSING_TOKENS = frozenset({RAW_MISSING, ""})

SPLITS = ("train", "valid", "test")

# The user's activity (`sequence.activity` of the data config, docs/etl.md): the rows and the
# likes of the row's own entity and of the other entity in the history the row may see (the
# frames its liked-item sequences are built from), as four bucketized user features. Named by
# the entity's relation to the row, not by the entity: "the user's likes in this entity" means
# the same on a video row and an article row, so a joint model shares what it learns of it.
# Fixed, roughly geometric bucket boundaries, so no train statistics are needed and serving
# buckets a feature store's counts the same way: index FIRST_INDEX + #{b <= count}, i.e.
# 0, 1, 2, 3, 4-5, 6-7, 8-11, ... .
ACTIVITY_BOUNDARIES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
ACTIVITY_COUNTS = ("rows", "likes")
ACTIVITY_RELATIONS = ("own", "other")


def activity_feature(count: str, relation: str) -> str:
    """The sample column of one activity count (`ACTIVITY_COUNTS`) of the row's own or the
    other entity (`ACTIVITY_RELATIONS`)."""
    return f"activity_{count}_{relation}"


# The samples directory (OUT_DIR): three Delta tables and the feature schema beside them.
SAMPLES_TABLE = "samples"
VOCAB_TABLE = "vocab"
QUARANTINE_TABLE = "quarantine"
SCHEMA_FILE = "feature_schema.json"


class ConfigError(ValueError):
    """A config (data, run, sweep or model parameters) that cannot be used; the message names
    the file and the key."""
