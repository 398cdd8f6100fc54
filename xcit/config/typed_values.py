"""Values from YAML or the command line, coerced to a config field's type annotation (MindCV's spellings of
booleans, numbers YAML 1.1 leaves as strings, lists and mappings given as text)."""

from __future__ import annotations

import math
import types
import typing
from typing import Any, Union

import yaml


def str2bool(v: Any) -> bool:
    """MindCV's booleans: True/False, true/false, yes/no, 1/0."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    if isinstance(v, str) and v.strip().lower() in ("true", "yes", "1"):
        return True
    if isinstance(v, str) and v.strip().lower() in ("false", "no", "0"):
        return False
    raise ValueError(f"expected a boolean (True/False), got {v!r}")


def convert_value(value: Any, tp: Any) -> Any:
    """Coerce a YAML or command-line value to a field's type, or raise ValueError."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.lower() in ("none", "null"))):
            return None
        for a in (a for a in args if a is not type(None)):
            try:
                return convert_value(value, a)
            except ValueError:
                continue
        raise ValueError(f"expected {' or '.join(getattr(a, '__name__', str(a)) for a in args)}, got {value!r}")
    if tp is bool:
        return str2bool(value)
    if tp is int:
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ValueError(f"expected an integer, got {value!r}")
        return int(value) if not isinstance(value, str) else int(value.strip())
    if tp is float:
        if isinstance(value, bool):
            raise ValueError(f"expected a number, got {value!r}")
        number = float(value)  # also parses "1e-5", which YAML 1.1 leaves as a string
        if not math.isfinite(number):
            raise ValueError(f"expected a finite number, got {value!r}")
        return number
    if tp is str:
        if not isinstance(value, str):
            raise ValueError(f"expected a string, got {value!r}")
        return value
    if origin in (tuple, list) or tp in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value if value.strip().startswith("[") else f"[{value}]")
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"expected a list, got {value!r}")
        if origin is tuple and len(value) != len(args):
            raise ValueError(f"expected {len(args)} values, got {list(value)!r}")
        items = [
            convert_value(x, args[i] if origin is tuple else (args[0] if args else float)) for i, x in enumerate(value)
        ]
        return tuple(items) if origin is tuple else items
    if tp is dict or origin is dict:
        value = yaml.safe_load(value) if isinstance(value, str) else value
        if not isinstance(value, dict):
            raise ValueError(f"expected a mapping like {{embed_dim: 64}}, got {value!r}")
        return dict(value)
    raise ValueError(f"unsupported type {tp}")
