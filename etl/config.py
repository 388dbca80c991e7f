"""Data-set configuration: which raw columns feed which of the paper's four feature groups.

A YAML file (conf/data/*.yaml) maps two entities' raw files onto eq. 1 of the paper:
user profile features, one behaviour sequence per entity, entity-shared features and
entity-specific features. Loading validates the file completely; every error names the key
path it is about (e.g. ``features.specific.article.item_score9``). Checking the columns
against the raw files' headers needs those headers, so it is a separate step
(:meth:`DataConfig.check_header`) that the Spark job runs before reading any data.

Plain Python on purpose: tests and the trainer can load a config without Spark.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mkt.config_file import read_config_file
from mkt.contract import ACTIVITY_COUNTS, ACTIVITY_RELATIONS, ConfigError, activity_feature

GROUPS = ("user", "shared", "specific")
KINDS = ("categorical", "bucketized")
HISTORY_MODES = ("frozen", "online")
DUPLICATE_POLICIES = ("keep", "drop")
# Files per (entity, split) partition of `samples`: past a few thousand, listing and opening
# them costs more than any shuffle they buy.
MAX_FILES_PER_PARTITION = 4096
# Options for the driver JVM (on a local master it also runs the executors). The job cannot set
# them once its JVM runs, so its command passes them (docs/etl.md):
#   spark-submit --driver-java-options "-XX:+UseParallelGC" ...
# (a cluster's executors: spark.executor.extraJavaOptions). The parallel collector: on 2 cores
# G1's barriers and concurrent threads cost more CPU than its pauses save, and the parallel
# collector, which sizes its young generation itself, takes about half the GC CPU of the serial
# one (docs/BENCHMARKS.md). Until the Arrow passes (stop 37) a 10x higher JIT compile threshold
# (-XX:CompileThresholdScaling=10) saved a fifth of the JVM's CPU; with the rows' work in the
# passes it no longer pays: 5M rows on local[2], 5 runs each, 50.4 s wall on average with the
# default threshold, 55.2 s with the higher one, the same CPU (docs/BENCHMARKS.md, "Stop 37").
DRIVER_JAVA_OPTIONS = "-XX:+UseParallelGC"

ROLES = ("source", "target")
# Columns every sample carries besides the features (docs/data-contract.md).
RESERVED_COLUMNS = ("entity", "split", "line_no", "user_key", "label")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


@dataclass(frozen=True)
class Entity:
    name: str
    file: str
    role: str


@dataclass(frozen=True)
class Feature:
    """One model input. ``columns`` maps each entity the feature applies to onto its raw column."""

    name: str
    group: str
    kind: str
    columns: dict[str, str]
    key: str  # config key path, for error messages
    entity: str | None = None  # the owning entity of a specific feature
    per_entity_ids: bool = False  # raw values are separate id spaces per entity (Tenrec item_id)
    buckets: int | None = None  # bucketized only
    # Categorical only: a raw value seen on fewer train rows than this is out-of-vocabulary.
    min_count: int = 1


@dataclass(frozen=True)
class DataConfig:
    name: str
    entities: tuple[Entity, ...]
    user_key: str
    label: str
    id_columns: tuple[str, ...]
    leaky_columns: tuple[str, ...]
    features: tuple[Feature, ...]
    item_feature: str
    seq_len: int
    history_mode: str
    # The user's rows and likes of the row's own and the other entity in the history the row
    # sees, as user features (mkt.contract.ACTIVITY_RELATIONS).
    activity: bool
    test_fraction: float
    valid_fraction: float
    duplicates: str
    quantile_accuracy: int
    files_per_partition: int

    @property
    def entity_names(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.entities)

    @property
    def source_entity(self) -> str:
        return next(e.name for e in self.entities if e.role == "source")

    @property
    def target_entity(self) -> str:
        return next(e.name for e in self.entities if e.role == "target")

    def entity(self, name: str) -> Entity:
        return next(e for e in self.entities if e.name == name)

    def feature(self, name: str) -> Feature:
        return next(f for f in self.features if f.name == name)

    def features_of(self, entity: str) -> tuple[Feature, ...]:
        return tuple(f for f in self.features if entity in f.columns)

    def required_columns(self, entity: str) -> dict[str, str]:
        """Raw column -> the config key that needs it, for one entity's file."""
        needed = {self.user_key: "user_key", self.label: "label"}
        for f in self.features_of(entity):
            needed.setdefault(f.columns[entity], f.key)
        for i, column in enumerate(self.id_columns):
            needed.setdefault(column, f"id_columns[{i}]")
        return needed

    def check_header(self, entity: str, header: list[str]) -> None:
        """Fail on the first config key whose column the entity's raw file lacks."""
        file = self.entity(entity).file
        for column, key in self.required_columns(entity).items():
            if column not in header:
                raise ConfigError(f"{key}: column {column!r} not in {file} header")

    def with_overrides(self, **values: Any) -> DataConfig:
        """Replace run options (seq_len, history_mode, duplicates, ...) and validate them."""
        unknown = set(values) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown override(s): {sorted(unknown)}")
        new = dataclasses.replace(self, **{k: v for k, v in values.items() if v is not None})
        _check_run_options(new)
        return new


def load_config(path: str | Path) -> DataConfig:
    """Read and validate a data config YAML; raise ConfigError naming the bad key."""
    raw = read_config_file(path, "data config")
    try:
        return parse_config(raw)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def parse_config(raw: Any) -> DataConfig:
    """Validate an already-parsed YAML document (a dict) into a DataConfig."""
    top = _mapping(raw, "")
    _only_keys(
        top,
        "",
        required=("name", "entities", "user_key", "label", "features", "sequence", "split"),
        optional=(
            "id_columns",
            "leaky_columns",
            "duplicates",
            "buckets",
            "min_count",
            "quantile_accuracy",
            "files_per_partition",
        ),
    )
    entities = _parse_entities(top["entities"])
    names = tuple(e.name for e in entities)
    defaults = {
        "buckets": _int(top.get("buckets", 10), "buckets", minimum=2),
        "min_count": _int(top.get("min_count", 1), "min_count", minimum=1),
    }
    features = _parse_features(top["features"], names, defaults)

    sequence = _mapping(top["sequence"], "sequence")
    _only_keys(
        sequence,
        "sequence",
        required=("item_feature",),
        optional=("seq_len", "history_mode", "activity"),
    )
    split = _mapping(top["split"], "split")
    _only_keys(split, "split", required=("test_fraction",), optional=("valid_fraction",))

    config = DataConfig(
        name=_str(top["name"], "name"),
        entities=entities,
        user_key=_str(top["user_key"], "user_key"),
        label=_str(top["label"], "label"),
        id_columns=tuple(_str_list(top.get("id_columns", []), "id_columns")),
        leaky_columns=tuple(_str_list(top.get("leaky_columns", []), "leaky_columns")),
        features=features,
        item_feature=_str(sequence["item_feature"], "sequence.item_feature"),
        seq_len=_int(sequence.get("seq_len", 20), "sequence.seq_len", minimum=1),
        history_mode=_str(sequence.get("history_mode", "frozen"), "sequence.history_mode"),
        activity=_bool(sequence.get("activity", False), "sequence.activity"),
        test_fraction=_fraction(split["test_fraction"], "split.test_fraction"),
        valid_fraction=_fraction(split.get("valid_fraction", 0.1), "split.valid_fraction"),
        duplicates=_str(top.get("duplicates", "keep"), "duplicates"),
        quantile_accuracy=_int(top.get("quantile_accuracy", 10000), "quantile_accuracy", minimum=1),
        files_per_partition=_int(
            top.get("files_per_partition", 8),
            "files_per_partition",
            minimum=1,
            maximum=MAX_FILES_PER_PARTITION,
        ),
    )
    _check_run_options(config)
    _check_columns(config)
    return config


# --------------------------------------------------------------------------------------------
# Sections.
# --------------------------------------------------------------------------------------------


def _parse_entities(raw: Any) -> tuple[Entity, ...]:
    block = _mapping(raw, "entities")
    entities = []
    for name, spec in block.items():
        key = f"entities.{name}"
        _identifier(name, key)
        spec = _mapping(spec, key)
        _only_keys(spec, key, required=("file", "role"))
        role = _str(spec["role"], f"{key}.role")
        if role not in ROLES:
            raise ConfigError(f"{key}.role: must be one of {list(ROLES)}, got {role!r}")
        entities.append(Entity(name, _str(spec["file"], f"{key}.file"), role))
    roles = sorted(e.role for e in entities)
    if roles != sorted(ROLES):
        raise ConfigError(
            f"entities: need exactly one source and one target entity, got roles {roles}"
        )
    return tuple(entities)


def _parse_features(
    raw: Any, entities: tuple[str, ...], defaults: dict[str, int]
) -> tuple[Feature, ...]:
    block = _mapping(raw, "features")
    _only_keys(block, "features", required=("user", "shared", "specific"))
    seen: dict[str, str] = {}
    features = []

    def add(name: Any, spec: Any, key: str, group: str, applies_to: tuple[str, ...]) -> None:
        _identifier(name, key)
        if name in seen:
            raise ConfigError(f"{key}: feature {name!r} already defined at {seen[name]}")
        seen[name] = key
        features.append(_parse_feature(name, spec, key, group, applies_to, defaults))

    for group in ("user", "shared"):
        for name, spec in _mapping(block[group], f"features.{group}").items():
            add(name, spec, f"features.{group}.{name}", group, entities)
    specific = _mapping(block["specific"], "features.specific")
    for entity, group_block in specific.items():
        if entity not in entities:
            raise ConfigError(
                f"features.specific.{entity}: not an entity (entities: {list(entities)})"
            )
        for name, spec in _mapping(group_block, f"features.specific.{entity}").items():
            add(name, spec, f"features.specific.{entity}.{name}", "specific", (entity,))
    return tuple(features)


def _parse_feature(
    name: str,
    spec: Any,
    key: str,
    group: str,
    applies_to: tuple[str, ...],
    defaults: dict[str, int],
) -> Feature:
    # `name:` with nothing after it means "categorical, raw column named like the feature".
    spec = {} if spec is None else _mapping(spec, key)
    _only_keys(spec, key, optional=("kind", "source", "buckets", "min_count", "per_entity_ids"))
    kind = _str(spec.get("kind", "categorical"), f"{key}.kind")
    if kind not in KINDS:
        raise ConfigError(f"{key}.kind: must be one of {list(KINDS)}, got {kind!r}")
    if "buckets" in spec and kind != "bucketized":
        raise ConfigError(f"{key}.buckets: only a bucketized feature has buckets")
    if "min_count" in spec and kind != "categorical":
        raise ConfigError(f"{key}.min_count: only a categorical feature has a vocabulary to trim")
    per_entity_ids = spec.get("per_entity_ids", False)
    if not isinstance(per_entity_ids, bool):
        raise ConfigError(f"{key}.per_entity_ids: must be true or false")
    if per_entity_ids and (group != "shared" or kind != "categorical"):
        raise ConfigError(f"{key}.per_entity_ids: only for categorical shared features")

    source = spec.get("source", name)
    if isinstance(source, str):
        columns = dict.fromkeys(applies_to, source)
    else:
        by_entity = _mapping(source, f"{key}.source")
        for entity in by_entity:
            if entity not in applies_to:
                raise ConfigError(f"{key}.source.{entity}: feature does not apply to {entity!r}")
        columns = {e: _str(by_entity.get(e, name), f"{key}.source.{e}") for e in applies_to}
    buckets, min_count = None, 1
    if kind == "bucketized":
        buckets = _int(spec.get("buckets", defaults["buckets"]), f"{key}.buckets", minimum=2)
    else:
        min_count = _int(
            spec.get("min_count", defaults["min_count"]), f"{key}.min_count", minimum=1
        )
    entity = applies_to[0] if group == "specific" else None
    return Feature(name, group, kind, columns, key, entity, per_entity_ids, buckets, min_count)


def _check_run_options(config: DataConfig) -> None:
    if config.history_mode not in HISTORY_MODES:
        raise ConfigError(
            f"sequence.history_mode: must be one of {list(HISTORY_MODES)}, got {config.history_mode!r}"
        )
    if config.duplicates not in DUPLICATE_POLICIES:
        raise ConfigError(
            f"duplicates: must be one of {list(DUPLICATE_POLICIES)}, got {config.duplicates!r}"
        )
    if not isinstance(config.seq_len, int) or config.seq_len < 1:
        raise ConfigError(f"sequence.seq_len: must be an integer >= 1, got {config.seq_len!r}")


def _check_columns(config: DataConfig) -> None:
    """Cross-field rules: the label and leaky columns never feed a feature, names don't clash."""
    leaky = set(config.leaky_columns)
    if config.label in leaky:
        raise ConfigError(f"label: {config.label!r} is also listed in leaky_columns")
    if config.user_key in leaky:
        raise ConfigError(f"user_key: {config.user_key!r} is listed in leaky_columns")
    reserved = set(RESERVED_COLUMNS) | {
        name for e in config.entity_names for name in (f"seq_{e}", f"seq_{e}_len")
    }
    if config.activity:
        reserved |= {activity_feature(c, r) for c in ACTIVITY_COUNTS for r in ACTIVITY_RELATIONS}
    for f in config.features:
        if f.name in reserved:
            raise ConfigError(f"{f.key}: {f.name!r} is a reserved sample column name")
        for column in f.columns.values():
            if column == config.label:
                raise ConfigError(f"{f.key}: column {column!r} is the label")
            if column in leaky:
                raise ConfigError(
                    f"{f.key}: column {column!r} is in leaky_columns (observed after the "
                    "impression, it would leak the label)"
                )
    for entity in config.entity_names:
        used: dict[str, str] = {}
        for f in config.features_of(entity):
            column = f.columns[entity]
            if column in used:
                raise ConfigError(
                    f"{f.key}: column {column!r} of {entity!r} already feeds {used[column]}"
                )
            used[column] = f.key
    try:
        item = config.feature(config.item_feature)
    except StopIteration:
        raise ConfigError(
            f"sequence.item_feature: {config.item_feature!r} is not a feature"
        ) from None
    if item.group != "shared" or item.kind != "categorical":
        raise ConfigError(
            f"sequence.item_feature: {config.item_feature!r} must be a categorical shared "
            "feature (the sequence encoder shares its embedding across entities)"
        )


# --------------------------------------------------------------------------------------------
# Typed accessors that name the key on error.
# --------------------------------------------------------------------------------------------


def _mapping(value: Any, key: str) -> dict:
    if not isinstance(value, dict):
        raise ConfigError(f"{key or '<top level>'}: must be a mapping, got {type(value).__name__}")
    return value


def _only_keys(
    block: dict, key: str, required: tuple[str, ...] = (), optional: tuple[str, ...] = ()
) -> None:
    prefix = f"{key}." if key else ""
    for name in block:
        if name not in required and name not in optional:
            allowed = sorted(required + optional)
            raise ConfigError(f"{prefix}{name}: unknown key (allowed here: {allowed})")
    for name in required:
        if name not in block:
            raise ConfigError(f"{prefix}{name}: required key missing")


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a non-empty string, got {value!r}")
    return value


def _str_list(value: Any, key: str) -> list[str]:
    if not isinstance(value, list):
        raise ConfigError(f"{key}: must be a list, got {type(value).__name__}")
    return [_str(v, f"{key}[{i}]") for i, v in enumerate(value)]


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def _int(value: Any, key: str, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}: must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key}: must be an integer <= {maximum}, got {value!r}")
    return value


def _fraction(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= value < 1.0:
        raise ConfigError(f"{key}: must be a number in [0, 1), got {value!r}")
    return float(value)


def _identifier(name: Any, key: str) -> None:
    # Entity and feature names become column names and Delta partition values.
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"{key}: name must match {_NAME.pattern}")
