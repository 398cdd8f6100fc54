"""Sample indexes and the datasets over them: listing a folder tree, reading images, accounting for bad files.

* **Index from listings.** An ImageFolder split is indexed with ``os.scandir`` alone: names and directory types,
  no file is opened, so start-up costs one listing of the tree (torchvision's ``ImageFolder`` costs the same). The
  order is torchvision's (``sorted(os.walk(class_dir, followlinks=True))``, then sorted names).
* **Symlink loops.** Directory symlinks are followed, but a directory whose ``(st_dev, st_ino)`` is the split's
  own or one of its ancestors' is a loop: it is skipped with a warning naming the link, so every real file is
  listed once. A directory reached twice inside one class (two links to it) is listed once.
* **Bad files are found when read.** Zero-byte, non-image, truncated and oversized files
  (:func:`xcit.data.imageio.load_rgb`) never stop a run. In training a bad file is replaced by the next good image of
  the index; in validation it is skipped, so every decodable image is scored exactly once. Either way the item
  carries the error message (which names the file) to the main process, where :class:`CountingLoader` collects
  them for the per-epoch report.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate

from .imageio import ImageError, load_rgb

log = logging.getLogger("xcit")

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".jfif", ".gif")
MAX_SUBSTITUTES = 16  # a training item gives up after this many bad files in a row


# ----------------------------------------------------------------------------------------------------------------------
# Listing a folder tree
# ----------------------------------------------------------------------------------------------------------------------


def _dir_key(path: str | os.PathLike, entry: os.DirEntry | None = None) -> tuple[int, int]:
    st = entry.stat() if entry is not None else os.stat(path)  # follows symlinks
    return st.st_dev, st.st_ino


def _ancestor_keys(split_dir: Path) -> frozenset[tuple[int, int]]:
    """``(st_dev, st_ino)`` of the split folder and every folder above it (a link to any of them is a loop)."""
    real = Path(os.path.realpath(split_dir))
    return frozenset(_dir_key(p) for p in (real, *real.parents))


@dataclass
class Listing:
    """What a listing found besides the images: loops, and files that are not images (by name)."""

    loops: list[str] = field(default_factory=list)
    not_images: list[str] = field(default_factory=list)


def class_folders(split_dir: str | Path, listing: Listing | None = None) -> list[str]:
    """Sorted class folder names of an ImageFolder split; a class folder that links back up the tree is left out
    (and recorded in ``listing``)."""
    split_dir = Path(split_dir)
    above = _ancestor_keys(split_dir)
    names = []
    with os.scandir(split_dir) as it:
        for e in it:
            if e.name.startswith(".") or not e.is_dir():
                continue
            if e.is_symlink() and _dir_key(e.path, e) in above:
                if listing is not None:
                    listing.loops.append(f"{e.path} -> {os.readlink(e.path)}")
                continue
            names.append(e.name)
    return sorted(names)


def _list_class(class_dir: str, above: frozenset, listing: Listing) -> list[str]:
    """Image paths under ``class_dir`` relative to its parent, in torchvision's order, loops skipped."""
    parent = os.path.dirname(class_dir)
    found: list[tuple[str, list[str]]] = []  # (dirpath, sorted image names)
    seen = {_dir_key(class_dir)}
    stack = [(class_dir, above | seen)]
    while stack:
        d, chain = stack.pop()
        names = []
        with os.scandir(d) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                if e.is_dir():
                    key = _dir_key(e.path, e)
                    if key in chain:
                        listing.loops.append(f"{e.path} -> {os.readlink(e.path) if e.is_symlink() else e.path}")
                    elif key not in seen:
                        seen.add(key)
                        stack.append((e.path, chain | {key}))
                elif e.name.lower().endswith(IMG_EXTENSIONS):
                    names.append(e.name)
                else:
                    listing.not_images.append(e.path)
        found.append((d, sorted(names)))
    return [os.path.relpath(os.path.join(d, n), parent) for d, names in sorted(found) for n in names]


def list_folder(split_dir: str | Path, classes: list[str] | None = None) -> tuple[FolderSource, Listing]:
    """Index an ImageFolder split from directory listings. ``classes`` fixes the label order (default: the split's
    sorted class folders); folders outside ``classes`` are not listed."""
    split_dir = Path(split_dir)
    listing = Listing()
    found = class_folders(split_dir, listing)
    classes = found if classes is None else list(classes)
    index = {c: i for i, c in enumerate(classes)}
    above = _ancestor_keys(split_dir)
    paths: list[str] = []
    targets: list[int] = []
    for c in found:
        if c in index:
            rel = _list_class(str(split_dir / c), above, listing)
            paths += rel
            targets += [index[c]] * len(rel)
    return FolderSource(split_dir, classes, found, encode_paths(paths), np.asarray(targets, dtype=np.int64)), listing


def encode_paths(paths: list[str]) -> np.ndarray:
    """Relative paths as one fixed-width bytes array: about 40 MB for ImageNet's 1.3 M paths, one object to fork or
    send (a list of Python strings would be 1.3 M objects, each touched by every worker's reference counting)."""
    return np.array([p.encode() for p in paths], dtype=bytes) if paths else np.zeros(0, dtype="S1")


# ----------------------------------------------------------------------------------------------------------------------
# Sources: an index that can read item i
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class FolderSource:
    """An ImageFolder split's index: relative paths as one bytes array (compact, shared by forked workers)."""

    root: Path
    classes: list[str]
    found_classes: list[str]
    paths: np.ndarray  # bytes, relative to root
    targets: np.ndarray  # int64 labels

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode())

    def load(self, i: int, mode: str = "RGB"):
        return load_rgb(self.path(i), mode=mode)

    def subset(self, keep: list[int]) -> FolderSource:
        return FolderSource(self.root, self.classes, self.found_classes, self.paths[keep], self.targets[keep])


# ----------------------------------------------------------------------------------------------------------------------
# The dataset and its loader
# ----------------------------------------------------------------------------------------------------------------------


class ImageDataset(Dataset):
    """Item ``i`` of a source as ``(image, label, bad)``; ``bad`` holds the messages of files that failed to read.

    ``skip_bad=False`` (training): a bad file is replaced by the next good one in the index. ``skip_bad=True``
    (validation): the image is ``None`` and :func:`collate` leaves it out, so no image is ever scored twice.
    """

    def __init__(
        self, source, transform=None, skip_bad: bool = False, listing: Listing | None = None, mode: str = "RGB"
    ) -> None:
        self.source, self.transform, self.skip_bad = source, transform, skip_bad
        self.listing = listing or Listing()
        self.mode = mode  # how images are decoded: RGB, L (grey) or RGBA (4 bands), see xcit.data.imageio.to_mode

    @property
    def classes(self) -> list[str]:
        return self.source.classes

    @property
    def targets(self) -> list[int]:
        return self.source.targets.tolist()

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(path, label)`` of every image (folder sources)."""
        return [(self.source.path(i), int(y)) for i, y in enumerate(self.source.targets)]

    def __len__(self) -> int:
        return len(self.source)

    def subset(self, keep: list[int]) -> ImageDataset:
        return ImageDataset(self.source.subset(keep), self.transform, self.skip_bad, self.listing, self.mode)

    def __getitem__(self, i: int) -> tuple[torch.Tensor | None, int, tuple[str, ...]]:
        n, bad = len(self.source), []
        for k in range(1 if self.skip_bad else min(n, MAX_SUBSTITUTES)):
            j = (i + k) % n
            try:
                img = self.source.load(j, self.mode)
            except (ImageError, OSError) as e:
                bad.append(str(e))
                continue
            return (self.transform(img) if self.transform else img), int(self.source.targets[j]), tuple(bad)
        if self.skip_bad:
            return None, int(self.source.targets[i]), tuple(bad)
        raise ImageError(f"{MAX_SUBSTITUTES} consecutive images failed to decode near index {i}: {bad[-1]}")


def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Stack the good items of a batch; gather every item's bad-file messages."""
    good = [(x, y) for x, y, _ in batch if x is not None]
    bad = [msg for _, _, msgs in batch for msg in msgs]
    if not good:
        return torch.empty(0), torch.empty(0, dtype=torch.long), bad
    x, y = default_collate(good)
    return x, y, bad


class CountingLoader:
    """A DataLoader over an :class:`ImageDataset` (with :func:`collate`) that yields ``(x, y)`` and keeps the bad
    files' messages in :attr:`bad` until :meth:`take_bad`. Empty batches (all skipped) are not yielded. Other
    attributes (``sampler``, ``batch_size``, ``dataset``) are the DataLoader's."""

    def __init__(self, loader) -> None:
        self.loader, self.bad = loader, []

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str):
        if name == "loader":
            raise AttributeError(name)
        return getattr(self.loader, name)

    def __iter__(self):
        for x, y, bad in self.loader:
            self.bad += bad
            if len(y):
                yield x, y

    def take_bad(self) -> list[str]:
        """Every rank's bad-file messages since the last call, each file once (a collective: all ranks call it)."""
        from ..runtime.distributed import all_gather_object

        mine, self.bad = self.bad, []
        return list(dict.fromkeys(msg for msgs in all_gather_object(mine) for msg in msgs))


def report_bad_reads(loader, what: str, action: str, limit: int | None = None) -> int:
    """Log the bad files ``loader`` met since the last report, ``limit`` of them by name (all ranks call this;
    rank 0 logs); returns how many there were."""
    from ..runtime.distributed import is_main

    take = getattr(loader, "take_bad", None)
    bad = take() if take is not None else []
    if bad and is_main():
        shown = bad if limit is None else bad[:limit]
        more = f"; and {len(bad) - len(shown)} more" if len(bad) > len(shown) else ""
        log.warning("%s: %d unreadable images %s: %s%s", what, len(bad), action, "; ".join(shown), more)
    return len(bad)
