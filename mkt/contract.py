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

# The samples directory (OUT_DIR): three Delta tables and the feature schema beside them.
SAMPLES_TABLE = "samples"
VOCAB_TABLE = "vocab"
QUARANTINE_TABLE = "quarantine"
SCHEMA_FILE = "feature_schema.json"


class ConfigError(ValueError):
    """A config (data, run, sweep or model parameters) that cannot be used; the message names
    the file and the key."""
