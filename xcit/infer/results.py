"""``xcit predict --results-file``: predictions as a table file in the layouts of timm's ``inference.py``.

Columns are ``filename``, ``index`` (class indices), ``label`` (class names) and ``prob`` (probabilities), the
top-k in order. ``csv`` puts each rank in its own column (``index_0``, ``label_0``, ``prob_0``, ``index_1``, ...,
timm's ``--results-separate-col`` layout); the JSON layouts keep lists per column (scalars for top-1), as pandas
writes them for timm: ``json`` maps each filename to its columns, ``json-split`` gives ``columns`` and ``data``
rows, ``json-records`` one object per line.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..runtime.fileio import atomic_write
from .predict import Prediction

FORMATS = ("csv", "json", "json-split", "json-records")
COLUMNS = ("index", "label", "prob")


def results_format(path: str | os.PathLike, fmt: str | None = None) -> str:
    """The format asked for, else the one the file's extension names (``.json``, ``.jsonl``), else csv."""
    if fmt:
        return fmt
    return {".json": "json", ".jsonl": "json-records"}.get(Path(path).suffix.lower(), "csv")


def _row(p: Prediction) -> dict:
    cols = {c: [t[i] for t in p.topk] for i, c in enumerate(COLUMNS)}
    return {c: v[0] if len(v) == 1 else v for c, v in cols.items()}  # top-1: scalars, as timm squeezes them


def _csv(predictions: list[Prediction], f) -> None:
    k = max((len(p.topk) for p in predictions), default=1)
    header = ["filename"] + [f"{c}_{i}" for i in range(k) for c in COLUMNS] if k > 1 else ["filename", *COLUMNS]
    w = csv.writer(f)
    w.writerow(header)
    for p in predictions:
        w.writerow([p.path] + [x for t in p.topk for x in t])


def write_results(predictions: list[Prediction], path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Write ``predictions`` to ``path`` (atomically) in ``fmt`` (:data:`FORMATS`; default from the extension)."""
    fmt = results_format(path, fmt)
    if fmt not in FORMATS:
        raise ValueError(f"results format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    rows = [(p.path, _row(p)) for p in predictions]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            if fmt == "csv":
                _csv(predictions, f)
            elif fmt == "json":
                json.dump({name: row for name, row in rows}, f, indent=4)
            elif fmt == "json-split":
                json.dump({"columns": ["filename", *COLUMNS], "data": [[n, *r.values()] for n, r in rows]}, f, indent=4)
            else:
                f.writelines(json.dumps({"filename": n, **r}) + "\n" for n, r in rows)

    atomic_write(path, write)
    return Path(path)
