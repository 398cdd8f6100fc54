"""A sample index built once per job: rank 0 lists (or reads its cache), every other rank receives it.

Listing ImageNet (1.3 M files) costs seconds to minutes on a parallel file system; done by every rank of every node
and again at every resume, it would dominate start-up. :func:`shared_index` runs the listing on rank 0 only and
sends the result to the other ranks with ``torch.distributed.broadcast_object_list``. With a ``cache_dir`` (a
training run's ``ckpt_save_dir/data_index``) the index is also saved there as a plain ``.npz`` (no pickle: it loads
with ``allow_pickle=False``), keyed by the tree's top-level listing: the split folder's and each class folder's
path, inode and modification time. Adding, removing or renaming a file in a class folder changes that folder's
time, so the cache is rebuilt; a change deeper down (a nested subfolder) or a file rewritten in place is not seen:
delete ``data_index/`` to list again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import os
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..runtime import distributed

log = logging.getLogger("xcit")

INDEX_VERSION = 1


def folder_key(split_dir: Path, classes: list[str] | None) -> dict:
    """What an ImageFolder split's index depends on, from one listing of the split folder (no file opened)."""
    dirs = []
    with os.scandir(split_dir) as it:
        for e in sorted(it, key=lambda e: e.name):
            if e.is_dir() and not e.name.startswith("."):
                st = e.stat()
                dirs.append([e.name, st.st_ino, st.st_mtime_ns])
    st = os.stat(split_dir)
    return {"version": INDEX_VERSION, "kind": "folder", "split": os.path.realpath(split_dir),
            "split_stat": [st.st_ino, st.st_mtime_ns], "classes": classes, "dirs": dirs}  # fmt: skip


def _to_arrays(objs: dict[str, object]) -> tuple[dict[str, np.ndarray], dict]:
    """Dataclass instances -> flat ``name.field`` arrays plus a JSON-able description of how to rebuild them."""
    arrays, meta = {}, {}
    for name, obj in objs.items():
        fields = {}
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            kind = "array" if isinstance(v, np.ndarray) else "path" if isinstance(v, Path) else "list"
            arrays[f"{name}.{f.name}"] = v if kind == "array" else np.asarray(str(v) if kind == "path" else v, str)
            fields[f.name] = kind
        meta[name] = {"type": type(obj).__name__, "fields": fields}
    return arrays, meta


def _from_arrays(arrays, meta: dict, types: dict[str, type]) -> dict[str, object]:
    out = {}
    for name, m in meta.items():
        kw = {}
        for field_name, kind in m["fields"].items():
            v = arrays[f"{name}.{field_name}"]
            kw[field_name] = v if kind == "array" else Path(str(v)) if kind == "path" else v.tolist()
        out[name] = types[m["type"]](**kw)
    return out


def _cache_file(cache_dir: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return cache_dir / f"{Path(key['split']).name}-{digest}.npz"


def load_cached(path: Path, key: dict, types: dict[str, type]) -> dict[str, object] | None:
    """The cached objects if ``path`` holds an index for exactly ``key``; None when absent, stale or unreadable."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if json.loads(str(z["key"])) != json.loads(json.dumps(key)):
                return None
            return _from_arrays(z, json.loads(str(z["meta"])), types)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as e:  # torn or foreign: list again
        log.warning("ignoring the index cache %s (%s); listing again", path, e)
        return None


def save_cached(path: Path, key: dict, objs: dict[str, object]) -> None:
    from ..weights.files import atomic_write

    arrays, meta = _to_arrays(objs)
    buf = io.BytesIO()
    np.savez(buf, key=np.asarray(json.dumps(key)), meta=np.asarray(json.dumps(meta)), **arrays)
    atomic_write(path, lambda tmp: Path(tmp).write_bytes(buf.getvalue()))


class _Failure:
    """What rank 0 sends instead of an index when building it failed (the other ranks raise the same)."""

    def __init__(self, error: Exception) -> None:
        self.type, self.message = type(error), str(error)


def shared_index(
    what: str,
    key: Callable[[], dict],
    build: Callable[[], dict[str, object]],
    types: dict[str, type],
    cache_dir: Path | None = None,
) -> dict[str, object]:
    """``build()``'s objects, computed on rank 0 only (or read from ``cache_dir`` when the key matches) and
    broadcast to every rank. An error on rank 0 is raised on every rank, so no rank waits forever."""
    result: object = None
    if distributed.is_main():
        try:
            k = key()
            path = _cache_file(cache_dir, k) if cache_dir is not None else None
            result = load_cached(path, k, types) if path is not None else None
            if result is not None:
                log.info("%s: index read from %s (not listed again)", what, path)
            else:
                t0 = time.perf_counter()
                result = build()
                log.info("%s: listed in %.2f s", what, time.perf_counter() - t0)
                if path is not None:
                    try:
                        save_cached(path, k, result)
                    except OSError as e:  # a cache is an optimisation: a read-only or full disk lists again next time
                        log.warning("%s: index not cached (%s)", what, e)
        except (ValueError, OSError) as e:
            result = _Failure(e)
    result = distributed.broadcast_object(result)
    if isinstance(result, _Failure):
        raise result.type(result.message)
    return result
