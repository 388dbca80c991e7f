"""The feature schema written by `etl/build_samples.py` (see docs/data-contract.md).

This file is all a model needs to build its embeddings: every feature's group (the paper's
eq. 1: user, sequence, shared, specific), owning entity and vocabulary size.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mkt.contract import RESERVED_INDICES, SAMPLES_TABLE, SCHEMA_FILE

GROUPS = ("user", "sequence", "shared", "specific")
KINDS = ("categorical", "bucketized", "sequence")
SUPPORTED_FORMAT = 1


class SchemaError(ValueError):
    """A feature schema that cannot be used; the message names the offending key."""


@dataclass(frozen=True)
class Feature:
    name: str
    group: str
    kind: str
    vocab_size: int = 0
    entity: str | None = None
    seq_len: int = 0
    item_feature: str | None = None
    length_column: str | None = None
    boundaries: tuple[float, ...] = ()
    # Entities in whose raw files this feature's column is an integer id (`id_columns` of the
    # data config): the ETL rejects a line whose id is not an integer and looks up the id's
    # canonical text ("+007" -> "7"), so serving must do both too.
    integer_id: tuple[str, ...] = ()
    # Categorical: the fewest train rows a raw value needs for an index of its own (fewer: OOV).
    # Recorded, not applied here: the ETL left such values out of the `vocab` table, so the
    # serving encoder (mkt.encoding), which looks values up there, maps them to OOV too.
    min_count: int = 1


@dataclass(frozen=True)
class FeatureSchema:
    source_entity: str
    target_entity: str
    entities: tuple[str, ...]
    seq_len: int
    history_mode: str
    item_feature: str
    features: tuple[Feature, ...]
    columns: dict[str, str]
    dataset: str = ""
    raw_input: dict[str, Any] = field(default_factory=dict)
    counts: dict[str, Any] = field(default_factory=dict)
    # Liked rows per entity and split (same layout as `counts`); absent from older schema files.
    likes: dict[str, Any] = field(default_factory=dict)
    # The Delta version of each table the ETL committed with this file (the three commits are
    # not one transaction: this names the versions that belong together).
    table_versions: dict[str, int] = field(default_factory=dict)

    # -- lookups --------------------------------------------------------------------------
    def feature(self, name: str) -> Feature:
        for f in self.features:
            if f.name == name:
                return f
        raise KeyError(f"feature {name!r} is not in the schema")

    def group(self, group: str, entity: str | None = None) -> list[Feature]:
        """Features of one group; for `specific` and `sequence`, optionally of one entity."""
        return [
            f
            for f in self.features
            if f.group == group and (entity is None or f.entity is None or f.entity == entity)
        ]

    @property
    def user_features(self) -> list[Feature]:
        return self.group("user")

    @property
    def shared_features(self) -> list[Feature]:
        return self.group("shared")

    @property
    def sequences(self) -> list[Feature]:
        return self.group("sequence")

    def specific_features(self, entity: str) -> list[Feature]:
        return [f for f in self.features if f.group == "specific" and f.entity == entity]

    def entity_index(self, entity: str) -> int:
        """Position of an entity in `entities`; batches carry this as `entity_index`."""
        return self.entities.index(entity)

    @property
    def source_index(self) -> int:
        return self.entity_index(self.source_entity)

    @property
    def target_index(self) -> int:
        return self.entity_index(self.target_entity)

    @property
    def index_columns(self) -> list[str]:
        """Every int64 scalar column a model reads (features and sequence lengths)."""
        cols = [f.name for f in self.features if f.group != "sequence"]
        cols += [f.length_column for f in self.sequences if f.length_column]
        return cols

    def like_rate(self, entity: str, split: str = "train") -> float | None:
        """Share of liked rows of one entity in one split, from the schema file's counts
        (None where the file does not record them)."""
        rows = self.counts.get(entity, {}).get(split)
        likes = self.likes.get(entity, {}).get(split)
        if not rows or likes is None:
            return None
        return int(likes) / int(rows)

    # -- (de)serialisation ----------------------------------------------------------------
    @classmethod
    def from_dict(cls, raw: dict[str, Any], origin: str = "feature schema") -> FeatureSchema:
        def need(key: str) -> Any:
            if key not in raw:
                raise SchemaError(f"{origin}: missing key {key!r}")
            return raw[key]

        version = need("format_version")
        if version != SUPPORTED_FORMAT:
            raise SchemaError(
                f"{origin}: format_version {version!r} is not supported "
                f"(this library reads {SUPPORTED_FORMAT})"
            )
        entities = tuple(need("entities"))
        features = []
        for i, f in enumerate(need("features")):
            where = f"{origin}: features[{i}]"
            for key in ("name", "group", "kind"):
                if key not in f:
                    raise SchemaError(f"{where}: missing key {key!r}")
            if f["group"] not in GROUPS:
                raise SchemaError(f"{where}.group: {f['group']!r} is not one of {GROUPS}")
            if f["kind"] not in KINDS:
                raise SchemaError(f"{where}.kind: {f['kind']!r} is not one of {KINDS}")
            if f.get("entity") is not None and f["entity"] not in entities:
                raise SchemaError(f"{where}.entity: {f['entity']!r} is not one of {entities}")
            if f["group"] in ("specific", "sequence") and f.get("entity") is None:
                raise SchemaError(f"{where}.entity: a {f['group']} feature needs an entity")
            unknown = [e for e in f.get("integer_id", ()) if e not in entities]
            if unknown:
                raise SchemaError(f"{where}.integer_id: {unknown} are not among {entities}")
            if f["kind"] != "sequence" and int(f.get("vocab_size", 0)) < 4:
                raise SchemaError(f"{where}.vocab_size: must be >= 4 (3 reserved indices + 1)")
            features.append(
                Feature(
                    name=f["name"],
                    group=f["group"],
                    kind=f["kind"],
                    vocab_size=int(f.get("vocab_size", 0)),
                    entity=f.get("entity"),
                    seq_len=int(f.get("seq_len", 0)),
                    item_feature=f.get("item_feature"),
                    length_column=f.get("length_column"),
                    boundaries=tuple(f.get("boundaries", ())),
                    integer_id=tuple(f.get("integer_id", ())),
                    min_count=int(f.get("min_count", 1)),
                )
            )
        schema = cls(
            source_entity=need("source_entity"),
            target_entity=need("target_entity"),
            entities=entities,
            seq_len=int(need("seq_len")),
            history_mode=need("history_mode"),
            item_feature=need("item_feature"),
            features=tuple(features),
            columns=dict(need("columns")),
            dataset=raw.get("dataset", ""),
            raw_input=dict(raw.get("raw_input", {})),
            counts=dict(raw.get("counts", {})),
            likes=dict(raw.get("likes", {})),
            table_versions=dict(raw.get("table_versions", {})),
        )
        for key in ("source_entity", "target_entity"):
            if getattr(schema, key) not in entities:
                raise SchemaError(f"{origin}.{key}: not one of entities {entities}")
        names = [f.name for f in features]
        if len(set(names)) != len(names):
            raise SchemaError(f"{origin}: duplicate feature names in {names}")
        if schema.item_feature not in names:
            raise SchemaError(f"{origin}.item_feature: {schema.item_feature!r} is not a feature")
        item_group = schema.feature(schema.item_feature).group
        if item_group != "shared":
            # The sequence attention's query is the row's item embedding and its keys index
            # the same table, for both entities' rows and sequences (section 3.2.1): only an
            # entity-shared feature is present on every row.
            raise SchemaError(
                f"{origin}.item_feature: {schema.item_feature!r} is a {item_group} feature; "
                "the attention's item feature must be an entity-shared feature (group 'shared')"
            )
        for f in schema.sequences:
            if f.item_feature != schema.item_feature:
                raise SchemaError(
                    f"{origin}: sequence {f.name!r} must index item_feature {schema.item_feature!r}"
                )
        return schema

    @classmethod
    def load(cls, path: str | Path) -> FeatureSchema:
        path = Path(path)
        if path.is_dir():
            path = path / SCHEMA_FILE
        if not path.exists():
            raise SchemaError(f"{path}: feature schema not found (run etl/build_samples.py first)")
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(raw, origin=str(path))

    def to_dict(self) -> dict[str, Any]:
        """The file's content: the one writer of feature_schema.json (the ETL, export and the
        training checkpoints all write it through here)."""
        feats = []
        for f in self.features:
            d: dict[str, Any] = {
                "name": f.name,
                "group": f.group,
                "entity": f.entity,
                "kind": f.kind,
            }
            if f.kind == "sequence":
                d["item_feature"] = f.item_feature
            if f.kind != "sequence" or f.vocab_size:
                d["vocab_size"] = f.vocab_size
            if f.kind == "sequence":
                d.update(seq_len=f.seq_len, length_column=f.length_column)
            if f.boundaries:
                d["boundaries"] = list(f.boundaries)
            if f.integer_id:
                d["integer_id"] = list(f.integer_id)
            if f.kind == "categorical":
                d["min_count"] = f.min_count
            feats.append(d)
        return {
            "format_version": SUPPORTED_FORMAT,
            "dataset": self.dataset,
            "source_entity": self.source_entity,
            "target_entity": self.target_entity,
            "entities": list(self.entities),
            "seq_len": self.seq_len,
            "history_mode": self.history_mode,
            "reserved_indices": dict(RESERVED_INDICES),
            "item_feature": self.item_feature,
            "features": feats,
            "columns": self.columns,
            "raw_input": self.raw_input,
            "counts": self.counts,
            "likes": self.likes,
            **({"table_versions": self.table_versions} if self.table_versions else {}),
        }


def samples_table(out_dir: str | Path) -> Path:
    """The `samples` Delta table of OUT_DIR (what etl/build_samples.py writes)."""
    path = Path(out_dir) / SAMPLES_TABLE
    if not (path / "_delta_log").is_dir():
        raise SchemaError(f"{path}: not a Delta table (run etl/build_samples.py first)")
    return path


def load_samples_dir(out_dir: str | Path) -> FeatureSchema:
    """OUT_DIR's feature schema, once OUT_DIR is checked to hold the schema file and the
    samples table: the one check of the samples layout, before any cluster starts."""
    schema = FeatureSchema.load(Path(out_dir) / SCHEMA_FILE)
    samples_table(out_dir)
    return schema
