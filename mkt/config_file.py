"""Config files: the one YAML reader (data, run and sweep configs) and the check of a config
against the dataclass that declares it.

The reader wants a mapping at the top, and a key written twice in one mapping is an error
naming its file and line (PyYAML would keep the last one silently, so a duplicated key could
quietly undo a setting)."""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from mkt.contract import ConfigError


class _UniqueKeyLoader(yaml.SafeLoader):
    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_config_file(path: str | Path, what: str = "config") -> dict[str, Any]:
    """The mapping a YAML config file holds ({} for an empty file)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {what} not found")
    with path.open() as handle:  # read from the file, so that YAML's errors name it
        try:
            data = yaml.load(handle, Loader=_UniqueKeyLoader)  # a SafeLoader subclass
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys")
    return data


def check_typed(cls: type, data: Mapping[str, Any], path: str = "") -> None:
    """Check a config mapping against a dataclass that declares it: every key declared (an
    unknown one is an error naming its dotted path), every declared key present, every value
    of its declared type (int where float is declared is fine; bool is never an int).
    Supported annotations: dataclasses, int, float, bool, str, Any, X | None, Literal[...],
    list[X] and dict[str, X]."""
    hints = typing.get_type_hints(cls)
    where = f"{path}." if path else ""
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ConfigError(f"unknown key {where}{unknown[0]!s}; known: {sorted(hints)}")
    missing = sorted(set(hints) - set(data))
    if missing:
        raise ConfigError(f"{where}{missing[0]}: required key missing")
    for name, hint in hints.items():
        check_value(hint, data[name], f"{where}{name}")


def check_value(hint: Any, value: Any, path: str) -> None:
    if dataclasses.is_dataclass(hint):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: must be a mapping, got {value!r}")
        check_typed(hint, value, path)
        return
    if not _matches(hint, value, path):
        raise ConfigError(f"{path}: expects {describe(hint)}, got {value!r}")


def _matches(hint: Any, value: Any, path: str) -> bool:
    origin = typing.get_origin(hint)
    if hint is Any:
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(h, value, path) for h in typing.get_args(hint))
    if origin is typing.Literal:
        return any(value == v and type(value) is type(v) for v in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            return False
        for i, v in enumerate(value):
            check_value(item, v, f"{path}[{i}]")
        return True
    if origin is dict:
        _, item = typing.get_args(hint)
        if not isinstance(value, Mapping):
            return False
        for k, v in value.items():
            check_value(item, v, f"{path}.{k}")
        return True
    if hint is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def describe(hint: Any) -> str:
    """A declared type as the error names it: `int | None` -> "null or int"."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " or ".join(repr(v) for v in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        named = [describe(a) for a in args if a is not type(None)]
        return " or ".join((["null"] if type(None) in args else []) + named)
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")
