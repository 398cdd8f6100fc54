"""Block indices as timm takes them (``timm.models._features.feature_take_indices``): a list of indices, negative
ones counting from the end as Python counts them, or an int n for the last n blocks. An index past either end is a
``ValueError`` naming it and the number of blocks, never wrapped around."""

from __future__ import annotations

from collections.abc import Sequence


def block_indices(indices: int | Sequence[int] | None, count: int, what: str = "XCA blocks") -> list[int]:
    """``indices`` of ``count`` blocks as non-negative positions, in the order given.

    None takes every block, an int n the last n, and a sequence each index in it (``-1`` is the last block).
    """
    if indices is None:
        return list(range(count))
    if isinstance(indices, int):
        if not 0 < indices <= count:
            raise ValueError(f"last-n ({indices}) is out of range (1 to {count}) for a model with {count} {what}")
        return list(range(count - indices, count))
    taken = []
    for i in indices:
        at = count + i if i < 0 else i
        if not 0 <= at < count:
            raise ValueError(
                f"feature index {i} is out of range (0 to {count - 1}, or -{count} to -1 from the end) "
                f"for a model with {count} {what}"
            )
        taken.append(at)
    return taken
