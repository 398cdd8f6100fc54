"""The three dataset formats behind one interface: ImageFolder trees, WebDataset shards, Hugging Face datasets.

``data_format: auto`` picks the format from what ``data_dir`` holds: a ``dataset_dict.json`` or ``data/*.parquet``
is a Hugging Face dataset (:mod:`xcit.data.hfdata`), ``.tar`` shards of the training split are WebDataset shards
(:mod:`xcit.data.shards`), anything else an ImageFolder tree (:mod:`xcit.data.readers`). Each split opens as a source
with
``classes``, ``targets``, ``load(i)`` and ``subset(keep)``; :func:`relabel` maps its labels onto another class list
(a checkpoint's, or training's) by name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .index_cache import folder_key, shared_index
from .readers import FolderSource, Listing, list_folder

FORMATS = ("auto", "folder", "wds", "hf")


def detect_format(root: Path, train_split: str, val_split: str) -> str:
    """``hf``, ``wds`` or ``folder`` from the files under ``root``."""
    from .hfdata import is_hf
    from .shards import split_shards

    if is_hf(root):
        return "hf"
    if split_shards(root, train_split) or split_shards(root, val_split):
        return "wds"
    return "folder"


def layout(fmt: str, root: Path) -> str:
    """The expected layout, for error messages."""
    return {
        "folder": f"ImageFolder layout: {root}/<split>/<class>/<image>",
        "wds": f"WebDataset shards: {root}/<split>/*.tar or {root}/*-<split>-*.tar",
        "hf": f"Hugging Face dataset: {root}/dataset_dict.json or {root}/data/<split>-*.parquet",
    }[fmt]


def open_split(fmt: str, root: Path, split: str, cache_dir: Path | None = None) -> tuple[object, Listing] | None:
    """``(source, listing)`` of one split, labels in the split's own class order; None when the split is absent.
    Folder and shard indexes are built on rank 0 only and cached in ``cache_dir`` (:mod:`xcit.data.index_cache`)."""
    if fmt == "hf":
        from .hfdata import open_hf

        return open_hf(root, split)
    if fmt == "wds":
        from .shards import ShardSource, list_shards, shards_key, split_shards

        shards = split_shards(root, split)
        if not shards:
            return None
        types = {"ShardSource": ShardSource, "Listing": Listing}
        what = f"{root}/{split}"
        objs = shared_index(what, lambda: shards_key(shards), lambda: list_shards(shards), types, cache_dir)
        return objs["source"], objs["listing"]
    split_dir = root / split
    if not split_dir.is_dir():
        return None
    objs = shared_index(
        str(split_dir),
        lambda: folder_key(split_dir, None),
        lambda: dict(zip(("source", "listing"), list_folder(split_dir))),
        {"FolderSource": FolderSource, "Listing": Listing},
        cache_dir,
    )
    return objs["source"], objs["listing"]


def relabel(source, classes: list[str]):
    """``source`` with labels as indices into ``classes`` (matched by name); samples of classes not in ``classes``,
    and unlabelled ones (label -1, as the hub's test splits), are left out."""
    if list(classes) == list(source.classes) and (source.targets >= 0).all():
        return source
    index = {c: i for i, c in enumerate(classes)}
    lut = np.asarray([index.get(c, -1) for c in source.classes] + [-1], dtype=np.int64)
    new = lut[np.where(source.targets >= 0, source.targets, len(source.classes))]
    keep = np.flatnonzero(new >= 0)
    out = source.subset(keep)
    out.targets, out.classes = new[keep], list(classes)
    return out
