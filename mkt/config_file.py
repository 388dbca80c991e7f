"""The one reader of YAML config files (data, run and sweep configs): the top level must be a
mapping, and a key written twice in one mapping is an error naming its file and line (PyYAML
would keep the last one silently, so a duplicated key could quietly undo a setting)."""

from __future__ import annotations

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
