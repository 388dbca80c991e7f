"""Raw feature values -> indices: the data contract's encoding rules, stated once in Python.

The ETL applies these rules when it builds `samples` (Spark parses, `etl/samples_pass.py`
looks up); serving (`mkt.serving`) applies them with this module to raw request values. The
two are held identical by `tests/test_serving.py`, which encodes every raw line of a generated
data set (planted with missing, unseen and oddly written values) with this module and compares
each index with the ETL's `samples`, and runs the number parser against Spark's own cast.

The rules (docs/data-contract.md, "Reserved indices"):
1. A raw value is text. It is trimmed of ASCII spaces at both ends (Spark's `trim`; tabs
   and other whitespace stay).
2. `\\N` or the empty string (after trimming) is missing: index 1 (`MISSING`).
3. Categorical: the trimmed text is looked up, exactly, in the feature's train vocabulary
   (for `per_entity_ids` features, in the vocabulary of the row's entity); a value not in
   it is out-of-vocabulary: index 2 (`OOV`). An integer id (the feature's `integer_id`
   entities) is first parsed as Spark's `try_cast(... AS BIGINT)` does (`parse_integer_id`)
   and looked up by its decimal text, so `+007` is `7`; the ETL quarantines a line whose id
   does not parse or is missing, and serving rejects such a request (`mkt.serving`).
4. Bucketized: the trimmed text is parsed as Spark's `try_cast(... AS DOUBLE)` does
   (`parse_number`); text that does not parse is OOV. A number x gets bucket
   `3 + #{b in boundaries : x >= b}`; NaN counts as greater than every boundary (Spark
   orders NaN above +inf), so it lands in the last bucket.
5. A specific feature of another entity than the row's is 0 (`PAD`, "not applicable").
6. Sequences hold the item feature's index of each liked item (rule 3, in the vocabulary of
   the entity the like belongs to), most recent first, padded with 0 to `seq_len`.

The reserved indices (0 pad, 1 missing, 2 OOV) are also written by the ETL into
`feature_schema.json` (`reserved_indices`). They are not re-derived here but checked:
`check_reserved_indices` compares the schema file's values with this module's and fails,
naming the file and both values, when they differ, so a change in the ETL cannot drift
silently from serving. `FeatureEncoder.from_schema_file` and `mkt.serving.Artifact` (on
load) and `train/export.py` (before export) call it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from mkt.contract import FIRST_INDEX, MISSING, MISSING_TOKENS, OOV, PAD, RESERVED_INDICES
from mkt.schema import Feature, FeatureSchema

RESERVED_KEY = "reserved_indices"


class EncodingContractError(ValueError):
    """A feature schema whose encoding constants differ from this module's; names the file."""


def check_reserved_indices(schema_json: Mapping[str, Any], origin: str) -> None:
    """Raise EncodingContractError unless the schema file's `reserved_indices` (as the ETL
    wrote it: `json.load` of feature_schema.json) equal `RESERVED_INDICES`."""
    written = schema_json.get(RESERVED_KEY) if isinstance(schema_json, Mapping) else None
    if written is None:
        raise EncodingContractError(
            f"{origin}: no {RESERVED_KEY!r}; mkt.encoding uses {RESERVED_INDICES} and cannot "
            "tell whether the ETL that wrote this schema does"
        )
    if not isinstance(written, Mapping) or dict(written) != RESERVED_INDICES:
        raise EncodingContractError(
            f"{origin}: {RESERVED_KEY} {written!r} differ from mkt.encoding's "
            f"{RESERVED_INDICES}: the ETL's encoding changed; update mkt/encoding.py (and its "
            "tests) to the ETL's rules before serving this schema's models"
        )


# java.lang.Double.parseDouble's grammar (what Spark's string -> double cast calls first):
# an optional sign, then NaN / Infinity (case-sensitive), a decimal with an optional exponent,
# or a hexadecimal with a binary exponent; decimals and hexadecimals may end in f/F/d/D.
# ASCII digits only: Python's float() would also take "1_0" and non-ASCII digits.
_JAVA_DECIMAL = re.compile(r"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?[fFdD]?")
_JAVA_HEX = re.compile(
    r"[+-]?0[xX](?:[0-9a-fA-F]+\.?[0-9a-fA-F]*|\.[0-9a-fA-F]+)[pP][+-]?[0-9]+[fFdD]?"
)
_JAVA_SPECIAL = {"NaN": math.nan, "Infinity": math.inf}
# UTF8String.toLong's grammar: an optional sign and ASCII digits, nothing else.
_INTEGER = re.compile(r"[+-]?[0-9]+")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
# Spark's fallback when parseDouble fails: these words, matched case-insensitively.
_SPARK_SPECIAL = {
    "inf": math.inf,
    "+inf": math.inf,
    "infinity": math.inf,
    "+infinity": math.inf,
    "-inf": -math.inf,
    "-infinity": -math.inf,
    "nan": math.nan,
}
# String.trim() in Java removes every code point up to U+0020.
_JAVA_TRIM = "".join(chr(c) for c in range(33))


def clean_text(value: str) -> str:
    """Rule 1: what the ETL compares and parses (Spark's `trim`: ASCII spaces only)."""
    return value.strip(" ")


def is_missing(cleaned: str) -> bool:
    """Rule 2, on a value already passed through `clean_text`."""
    return cleaned in MISSING_TOKENS


def parse_number(text: str) -> float | None:
    """Spark's `try_cast(text AS DOUBLE)`: the double, or None where Spark gives null."""
    trimmed = text.strip(_JAVA_TRIM)
    body = trimmed.lstrip("+-")
    if body in _JAVA_SPECIAL:
        value = _JAVA_SPECIAL[body]
        return -value if trimmed.startswith("-") else value
    if _JAVA_DECIMAL.fullmatch(trimmed):
        return float(trimmed.rstrip("fFdD"))
    if _JAVA_HEX.fullmatch(trimmed):
        return float.fromhex(trimmed.rstrip("fFdD"))
    return _SPARK_SPECIAL.get(trimmed.lower())


def parse_integer_id(text: str) -> int | None:
    """Spark's `try_cast(text AS BIGINT)`: the integer, or None where Spark gives null."""
    trimmed = text.strip(_JAVA_TRIM)
    if not _INTEGER.fullmatch(trimmed):
        return None
    value = int(trimmed)
    return value if _INT64_MIN <= value <= _INT64_MAX else None


def canonical_id(value: str | None) -> str | None:
    """An id value as the ETL keys it: its decimal text; None for a missing or non-integer
    value (lines the ETL quarantines, so the encoder gives them no index of their own)."""
    if value is None:
        return None
    number = parse_integer_id(clean_text(value))
    return None if number is None else str(number)


def bucket_indices(numbers: np.ndarray, boundaries: Sequence[float]) -> np.ndarray:
    """Rule 4 for parsed numbers: `3 + #{b : x >= b}`, NaN in the last bucket."""
    numbers = np.asarray(numbers, dtype=np.float64)
    edges = np.asarray(boundaries, dtype=np.float64)
    below = np.searchsorted(edges, numbers, side="right")
    below = np.where(np.isnan(numbers), len(edges), below)
    return (FIRST_INDEX + below).astype(np.int64)


class Vocabulary:
    """One vocabulary (a feature's, or one entity's id space of a `per_entity_ids` feature):
    sorted raw values and their indices, looked up with a binary search."""

    def __init__(self, raw_values: Sequence[str], indices: Sequence[int]) -> None:
        keys = np.asarray(list(raw_values), dtype=str)
        values = np.asarray(indices, dtype=np.int64)
        if keys.shape != values.shape:
            raise ValueError(f"{len(keys)} raw values but {len(values)} indices")
        order = np.argsort(keys, kind="stable")
        self.keys = keys[order]
        self.indices = values[order]
        if len(self.keys) > 1 and (self.keys[1:] == self.keys[:-1]).any():
            duplicate = self.keys[1:][self.keys[1:] == self.keys[:-1]][0]
            raise ValueError(f"raw value {duplicate!r} listed twice")
        if (self.indices < FIRST_INDEX).any():
            raise ValueError(f"vocabulary indices must be >= {FIRST_INDEX} (0-2 are reserved)")

    def __len__(self) -> int:
        return len(self.keys)

    def lookup(self, cleaned: Sequence[str]) -> np.ndarray:
        """Rule 3 for values that are not missing: the index, or OOV."""
        # The query keeps its own width: casting to the keys' width would truncate longer
        # values into false matches.
        query = np.asarray(list(cleaned), dtype=str)
        if len(self.keys) == 0 or len(query) == 0:
            return np.full(len(query), OOV, dtype=np.int64)
        pos = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        return np.where(self.keys[pos] == query, self.indices[pos], OOV).astype(np.int64)


class FeatureEncoder:
    """Every non-sequence feature's raw -> index transform, and the item transform of the
    sequences, for one feature schema and its train vocabularies."""

    def __init__(
        self, schema: FeatureSchema, vocabularies: Mapping[str, Mapping[str | None, Vocabulary]]
    ) -> None:
        """`vocabularies[feature][entity]`: `entity` is None for one shared id space, else
        the entity of a per-entity id space (the ETL's `vocab.entity` column)."""
        self.schema = schema
        self.vocabularies = {name: dict(spaces) for name, spaces in vocabularies.items()}

    @classmethod
    def from_schema_file(
        cls,
        schema_json: Mapping[str, Any],
        vocab_rows: Mapping[str, Sequence[Any]],
        origin: str = "feature schema",
    ) -> FeatureEncoder:
        """From feature_schema.json as the ETL wrote it (a parsed dict: its reserved indices
        are checked, `check_reserved_indices`) and the columns of the `vocab` table
        (`feature`, `entity`, `raw_value`, `index`)."""
        check_reserved_indices(schema_json, origin)
        schema = FeatureSchema.from_dict(dict(schema_json), origin=origin)
        columns = ("feature", "entity", "raw_value", "index")
        return cls.from_vocab_rows(schema, *(vocab_rows[c] for c in columns))

    @classmethod
    def from_vocab_rows(
        cls,
        schema: FeatureSchema,
        feature: Sequence[str],
        entity: Sequence[str | None],
        raw_value: Sequence[str],
        index: Sequence[int],
    ) -> FeatureEncoder:
        """From the columns of the ETL's `vocab` table (bucket rows are skipped: buckets come
        from the schema's boundaries)."""
        categorical = {f.name for f in schema.features if f.kind == "categorical"}
        grouped: dict[str, dict[str | None, tuple[list[str], list[int]]]] = {}
        for f, e, raw, i in zip(feature, entity, raw_value, index, strict=True):
            if f in categorical:
                keys, values = grouped.setdefault(f, {}).setdefault(e, ([], []))
                keys.append(raw)
                values.append(int(i))
        return cls(
            schema,
            {
                f: {e: Vocabulary(keys, values) for e, (keys, values) in spaces.items()}
                for f, spaces in grouped.items()
            },
        )

    def vocabulary(self, feature: str, entity: str) -> Vocabulary:
        """The vocabulary a raw value of `feature` on a row of `entity` is looked up in."""
        spaces = self.vocabularies.get(feature, {})
        if None in spaces:
            return spaces[None]
        # A per-entity id space with no train value of this entity: everything is OOV.
        return spaces.get(entity, Vocabulary([], []))

    def encode(self, feature: str, values: Sequence[Any], entity: str) -> np.ndarray:
        """Indices of `values` of `feature` on rows of `entity`.

        A value is text, None (missing, like `\\N`) or, for a bucketized feature, a number
        (used as parsed). Callers check the types (mkt.serving does, per request row).
        """
        f = self.schema.feature(feature)
        if f.group == "sequence":
            raise ValueError(f"{feature!r} is a sequence: encode its items with encode_items")
        if f.group == "specific" and f.entity != entity:
            return np.full(len(values), PAD, dtype=np.int64)  # rule 5
        if f.kind == "bucketized":
            return self._bucketize(values, f.boundaries)
        return self._categorical(values, f, entity)

    def encode_items(self, items: Sequence[str | None], entity: str) -> np.ndarray:
        """Rule 6: indices of liked items of `entity` (before padding)."""
        return self._categorical(items, self.schema.feature(self.schema.item_feature), entity)

    def _categorical(
        self, values: Sequence[str | None], feature: Feature, entity: str
    ) -> np.ndarray:
        vocab = self.vocabulary(feature.name, entity)
        cleaned = [None if v is None else clean_text(v) for v in values]
        missing = np.fromiter((c is None or is_missing(c) for c in cleaned), bool, len(cleaned))
        out = np.full(len(cleaned), MISSING, dtype=np.int64)
        present = np.flatnonzero(~missing)
        if not len(present):
            return out
        keys = [cleaned[i] for i in present]
        if entity in feature.integer_id:
            canonical = [canonical_id(k) for k in keys]
            # Not an integer: never a vocabulary key (the ETL quarantines such lines).
            keys = ["" if c is None else c for c in canonical]
        out[present] = vocab.lookup(keys)
        return out

    @staticmethod
    def _bucketize(values: Sequence[str | float | None], boundaries: Sequence[float]) -> np.ndarray:
        out = np.full(len(values), MISSING, dtype=np.int64)
        numbers = np.full(len(values), np.nan)
        parsed = np.zeros(len(values), dtype=bool)
        for i, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, str):
                text = clean_text(v)
                if is_missing(text):
                    continue
                number = parse_number(text)
                if number is None:
                    out[i] = OOV
                    continue
                numbers[i] = number
            else:
                numbers[i] = float(v)
            parsed[i] = True
        out[parsed] = bucket_indices(numbers[parsed], boundaries)
        return out
