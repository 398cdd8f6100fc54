"""``auto_augment`` policy strings, parsed completely.

timm's parsers (``timm.data.auto_augment``) skip a part they cannot split into letters and digits (``rand-mx``
trains as plain ``rand``) and assert without a message on others, so every part is checked here first and a bad
one is named. The grammar is timm's: ``POLICY-PART-PART...``, each part a key and its value, e.g.
``rand-m9-mstd0.5-inc1`` (MindCV spells the policies ``randaug``, ``autoaug`` and ``autoaugr``).
"""

from __future__ import annotations

import re

_INT = (r"\d+", "an integer", "int")
_FLOAT = (r"(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?", "a number", "float")
_BIT = (r"[01]", "0 or 1", "0|1")
_MSTD = {"mstd": _FLOAT}

# policy -> part key -> (value pattern, what it is, short form); the keys timm's parsers read
POLICIES: dict[str, dict[str, tuple[str, str, str]]] = {
    "rand": {
        "m": _INT,
        "n": _INT,
        "p": _FLOAT,
        "mstd": _FLOAT,
        "mmax": _INT,
        "inc": _BIT,
        "t": (r"weights|3a|3aw", "a transform set name: weights, 3a or 3aw", "weights|3a|3aw"),
    },  # fmt: skip
    "augmix": {"m": _INT, "w": _INT, "d": _INT, "a": _FLOAT, "b": _BIT, **_MSTD},
    "original": _MSTD,
    "originalr": _MSTD,
    "v0": _MSTD,
    "v0r": _MSTD,
    "3a": _MSTD,
}
MINDCV_NAMES = {"randaug": "rand", "autoaug": "original", "autoaugr": "originalr"}


def parse_policy(spec: str) -> tuple[str, dict[str, str]]:
    """``(policy, {key: value})`` of a timm or MindCV policy string; a ValueError names the first bad part."""
    head, *parts = spec.split("-")
    policy = MINDCV_NAMES.get(head, head)
    if policy not in POLICIES:
        names = ", ".join([*POLICIES, *MINDCV_NAMES, "trivialaugwide"])
        raise ValueError(f"unknown policy {head!r} (the part before the first '-'); known: {names}")
    allowed, values = POLICIES[policy], {}
    for part in parts:
        key = next((k for k in sorted(allowed, key=len, reverse=True) if part.startswith(k)), None)
        if key is None:
            keys = ", ".join(f"{k}<{tag}>" for k, (_, _, tag) in allowed.items())
            raise ValueError(f"unknown part {part!r} of the {policy!r} policy; its parts are {keys}")
        pattern, what, _ = allowed[key]
        value = part[len(key) :]
        if not re.fullmatch(pattern, value):
            raise ValueError(f"part {part!r}: {key} takes {what}, got {value!r}")
        values[key] = value
    return policy, values
