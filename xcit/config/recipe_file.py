"""Reading a YAML recipe strictly: a folder, a file that is not UTF-8 and a key given twice are named as such
(PyYAML lets the last of two equal keys win silently, and its decoding error names no file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..runtime.errors import ConfigError


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a mapping holding the same key twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if not isinstance(key, (list, dict)) and key in seen:
                raise _DuplicateKey(f"line {line}: key {key!r} appears twice (first on line {seen[key]}); keep one")
            if not isinstance(key, (list, dict)):
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def read_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML recipe as a flat dict (an empty file gives {}); anything else is a :class:`ConfigError` naming
    the file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {str(path)!r} is a directory, not a YAML file")
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); save the file as UTF-8"
        ) from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
    except _DuplicateKey as e:
        raise ConfigError(f"{path}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(data).__name__}")
    return data
