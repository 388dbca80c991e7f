"""Requests -> the serving graph's packed inputs, checked row by row.

Two kinds of input, each checked per row so that one bad row never fails its batch:
- raw requests (`RequestEncoder`): the raw values of the target entity's features, as in its
  raw file, plus the user's recent likes per entity; encoded with `mkt.encoding` (the
  ETL's rules), so unseen values become OOV exactly as in training;
- rows of the ETL's `samples` table (`check_sample_rows`): indices already, only checked.

A row that fails gets a reason naming the field; the others are encoded. Input whose shape
is wrong for every row (columns of different lengths, a samples batch without a column)
raises `RequestError`.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mkt.encoding import FeatureEncoder, canonical_id, clean_text, is_missing
from mkt.serving.graph import Interface

RECENT_LIKES = "recent_likes"
ENTITY_COLUMN = "entity"


class RequestError(ValueError):
    """Input that cannot be read as rows at all; the message says what is wrong."""


class _Absent:
    """A field a request row does not have (None is a present, missing value: `\\N`)."""

    def __repr__(self) -> str:
        return "<absent>"


ABSENT = _Absent()


@dataclass
class PackedRows:
    """The graph's inputs for n rows; rows listed in `errors` hold zeros and are not scored."""

    scalars: np.ndarray  # int64 [n, len(interface.scalars)]
    sequences: np.ndarray  # int64 [n, len(interface.sequences), seq_len]
    errors: dict[int, str] = field(default_factory=dict)  # row position -> reason

    @property
    def ok(self) -> np.ndarray:
        mask = np.ones(len(self.scalars), dtype=bool)
        mask[list(self.errors)] = False
        return mask


class _RowErrors:
    def __init__(self) -> None:
        self.by_row: dict[int, list[str]] = {}

    def add(self, row: int, text: str) -> None:
        self.by_row.setdefault(row, []).append(text)

    def joined(self) -> dict[int, str]:
        return {row: "; ".join(texts) for row, texts in sorted(self.by_row.items())}


def _is_integer(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool | np.bool_)


def _type_name(value: Any) -> str:
    return "absent" if value is ABSENT else type(value).__name__


def _text(value: Any) -> str | None:
    """A categorical raw value as the ETL sees it (text); raises TypeError otherwise."""
    if value is None or isinstance(value, str):
        return value
    if _is_integer(value):
        return str(int(value))
    raise TypeError(f"wrong type {_type_name(value)} (expected text or an integer)")


def _check_id(text: str | None) -> None:
    """Raises ValueError for an id the ETL would have quarantined its line for."""
    if text is None or is_missing(clean_text(text)):
        raise ValueError("missing id (the raw files' ids are never missing)")
    if canonical_id(text) is None:
        raise ValueError(f"not a 64-bit integer id: {text!r}")


def _text_or_number(value: Any) -> str | float | None:
    if value is None or isinstance(value, str):
        return value
    if _is_number(value):
        return float(value)
    raise TypeError(f"wrong type {_type_name(value)} (expected text or a number)")


class RequestEncoder:
    """Raw requests of the target entity -> `PackedRows`.

    A request is a mapping with one entry per raw field (`fields`: the user, shared and
    target-specific features, named as in the schema) and `recent_likes`: a mapping from
    every entity to the raw ids of the user's liked items of that entity, most recent first,
    at most `seq_len` of them. Other entries (the raw file's other columns) are ignored.
    Values: text as in the raw file, None for a missing value (like `\\N`), integers for
    categorical ids, numbers for bucketized features.
    """

    def __init__(self, encoder: FeatureEncoder, interface: Interface) -> None:
        self.encoder = encoder
        self.interface = interface
        schema = encoder.schema
        # Sequence name -> its length column; both are derived from the recent likes.
        self.length_columns = {f.name: f.length_column for f in schema.sequences}
        lengths = set(self.length_columns.values())
        self.fields = [n for n in interface.scalars if n not in lengths]
        self.kinds = {n: schema.feature(n).kind for n in self.fields}
        target = interface.target_entity
        self.integer_ids = {n for n in self.fields if target in schema.feature(n).integer_id}
        self.item_ids = schema.feature(schema.item_feature).integer_id
        self.sequence_entities = {n: schema.feature(n).entity for n in interface.sequences}

    def encode(self, requests: Any) -> PackedRows:
        """`requests`: a sequence of row mappings, a mapping of columns (lists of equal
        length), or a pyarrow Table / RecordBatch (`recent_likes` a struct of lists)."""
        n, columns, errors, not_rows = self._columns(requests)
        scalars = np.zeros((n, len(self.interface.scalars)), dtype=np.int64)
        sequences = np.zeros(
            (n, len(self.interface.sequences), self.interface.seq_len), dtype=np.int64
        )
        target = self.interface.target_entity
        for j, name in enumerate(self.interface.scalars):
            if name in self.fields:
                values = self._field_values(name, columns[name], errors, not_rows)
                scalars[:, j] = self.encoder.encode(name, values, target)
        likes = self._recent_likes(columns[RECENT_LIKES], errors, not_rows)
        for s, name in enumerate(self.interface.sequences):
            entity = self.sequence_entities[name]
            lengths = np.fromiter((len(row[entity]) for row in likes), np.int64, n)
            items = [item for row in likes for item in row[entity]]
            indices = self.encoder.encode_items(items, entity)
            rows = np.repeat(np.arange(n), lengths)
            slots = np.arange(len(items)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
            sequences[rows, s, slots] = indices
            scalars[:, self.interface.scalars.index(self.length_columns[name])] = lengths
        return PackedRows(scalars, sequences, errors.joined())

    def _columns(self, requests: Any) -> tuple[int, dict[str, list[Any]], _RowErrors, set[int]]:
        """(rows, columns of the wanted fields, errors so far, positions of rows that are not
        mappings: their fields are not checked again)."""
        errors = _RowErrors()
        wanted = [*self.fields, RECENT_LIKES]
        if isinstance(requests, pa.RecordBatch):
            requests = pa.Table.from_batches([requests])
        if isinstance(requests, pa.Table):
            n = requests.num_rows
            names = requests.column_names
            columns = {
                c: requests.column(c).to_pylist() if c in names else [ABSENT] * n for c in wanted
            }
            return n, columns, errors, set()
        if isinstance(requests, Mapping):
            lengths = {len(v) for v in requests.values()}
            if len(lengths) > 1:
                raise RequestError(f"columns of different lengths {sorted(lengths)}")
            n = lengths.pop() if lengths else 0
            columns = {c: list(requests[c]) if c in requests else [ABSENT] * n for c in wanted}
            return n, columns, errors, set()
        if isinstance(requests, str | bytes) or not isinstance(requests, Sequence):
            raise RequestError(
                "requests must be rows, a mapping of columns or a pyarrow Table, "
                f"not {type(requests).__name__}"
            )
        columns: dict[str, list[Any]] = {c: [] for c in wanted}
        not_rows = set()
        for i, row in enumerate(requests):
            if not isinstance(row, Mapping):
                errors.add(i, f"row is a {type(row).__name__}, not a mapping of fields")
                not_rows.add(i)
                row = {}
            for c in wanted:
                columns[c].append(row.get(c, ABSENT))
        return len(requests), columns, errors, not_rows

    def _field_values(
        self, name: str, values: list[Any], errors: _RowErrors, skip: set[int]
    ) -> list[Any]:
        convert = _text_or_number if self.kinds[name] == "bucketized" else _text
        out: list[Any] = []
        for i, value in enumerate(values):
            if i in skip:
                out.append(None)
            elif value is ABSENT:
                errors.add(i, f"{name}: missing field")
                out.append(None)
            else:
                try:
                    text = convert(value)
                    if name in self.integer_ids:
                        _check_id(text)
                    out.append(text)
                except (TypeError, ValueError) as e:
                    errors.add(i, f"{name}: {e}")
                    out.append(None)
        return out

    def _recent_likes(
        self, values: list[Any], errors: _RowErrors, skip: set[int]
    ) -> list[dict[str, list]]:
        """Per row, entity -> the items as text (or None); rows with errors get no items."""
        entities = list(self.sequence_entities.values())
        seq_len = self.interface.seq_len
        out: list[dict[str, list]] = []
        for i, value in enumerate(values):
            row: dict[str, list] = {e: [] for e in entities}
            out.append(row)
            if i in skip:
                continue
            if value is ABSENT:
                errors.add(i, f"{RECENT_LIKES}: missing field")
                continue
            if not isinstance(value, Mapping):
                errors.add(
                    i,
                    f"{RECENT_LIKES}: wrong type {_type_name(value)} (expected a mapping "
                    f"of {entities} to lists of item ids)",
                )
                continue
            for key in value:
                if key not in entities:
                    errors.add(i, f"{RECENT_LIKES}.{key}: not an entity of the schema {entities}")
            for entity in entities:
                where = f"{RECENT_LIKES}.{entity}"
                items = value.get(entity, ABSENT)
                if items is ABSENT:
                    errors.add(i, f"{where}: missing field (send [] for no likes)")
                elif isinstance(items, str | bytes) or not isinstance(items, Sequence | np.ndarray):
                    errors.add(i, f"{where}: wrong type {_type_name(items)} (expected a list)")
                elif len(items) > seq_len:
                    errors.add(i, f"{where}: {len(items)} items, more than seq_len {seq_len}")
                else:
                    try:
                        row[entity] = [_text(item) for item in items]
                        if entity in self.item_ids:
                            for item in row[entity]:
                                _check_id(item)
                    except TypeError as e:
                        errors.add(i, f"{where}: item of {e}")
                    except ValueError as e:
                        errors.add(i, f"{where}: {e}")
        for i in errors.by_row:
            out[i] = {e: [] for e in entities}
        return out


def check_sample_rows(
    rows: pa.Table | Mapping[str, Any], interface: Interface, vocab_sizes: Mapping[str, int]
) -> PackedRows:
    """Rows of the ETL's `samples` table (indices) -> `PackedRows`, checking each row: no
    null, sequences of exactly `seq_len` items, every index inside its vocabulary, lengths in
    0..seq_len, and (when the batch has an `entity` column) the artifact's target entity.
    A batch lacking a column raises RequestError naming it."""
    table = rows if isinstance(rows, pa.Table) else pa.table(dict(rows))
    missing = [c for c in (*interface.scalars, *interface.sequences) if c not in table.column_names]
    if missing:
        raise RequestError(f"samples batch lacks columns {missing}")
    n = table.num_rows
    seq_len = interface.seq_len
    errors = _RowErrors()
    scalars = np.zeros((n, len(interface.scalars)), dtype=np.int64)
    sequences = np.zeros((n, len(interface.sequences), seq_len), dtype=np.int64)

    def flag(mask: np.ndarray, text: str) -> None:
        for i in np.flatnonzero(mask):
            errors.add(int(i), text)

    if ENTITY_COLUMN in table.column_names:
        entity = table.column(ENTITY_COLUMN).to_pylist()
        for i, e in enumerate(entity):
            if e != interface.target_entity:
                errors.add(
                    i, f"entity: {e!r} row; this artifact scores {interface.target_entity!r}"
                )
    for j, name in enumerate(interface.scalars):
        column = table.column(name)
        flag(column.is_null().to_numpy(zero_copy_only=False), f"{name}: null")
        values = _int64(column.fill_null(0), name)
        upper = seq_len + 1 if name not in vocab_sizes else vocab_sizes[name]
        flag((values < 0) | (values >= upper), f"{name}: index outside 0..{upper - 1}")
        scalars[:, j] = values
    for s, name in enumerate(interface.sequences):
        column = table.column(name).combine_chunks()
        flag(column.is_null().to_numpy(zero_copy_only=False), f"{name}: null")
        lengths = pc.list_value_length(column).fill_null(seq_len).to_numpy()
        flag(lengths != seq_len, f"{name}: sequence of the wrong length (expected {seq_len})")
        good = np.flatnonzero(
            (lengths == seq_len) & column.is_valid().to_numpy(zero_copy_only=False)
        )
        items = column.take(pa.array(good, type=pa.int64())).flatten()
        flag_rows = np.repeat(good, seq_len)
        item_nulls = items.is_null().to_numpy(zero_copy_only=False)
        flag(np.isin(np.arange(n), flag_rows[item_nulls]), f"{name}: null item")
        values = _int64(items.fill_null(0), name).reshape(len(good), seq_len)
        size = vocab_sizes[name]
        outside = ((values < 0) | (values >= size)).any(axis=1)
        flag(np.isin(np.arange(n), good[outside]), f"{name}: item index outside 0..{size - 1}")
        sequences[good, s] = values
    return PackedRows(scalars, sequences, errors.joined())


def _int64(array: pa.Array | pa.ChunkedArray, name: str) -> np.ndarray:
    if not pa.types.is_integer(array.type):
        raise RequestError(f"column {name!r} holds {array.type}, not integer indices")
    return np.asarray(array.to_numpy(zero_copy_only=False), dtype=np.int64)
