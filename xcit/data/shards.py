"""WebDataset tar shards with random access: an index of the tar members, read with ``os.pread``.

A split is a folder of ``.tar`` shards as webdataset's ``ShardWriter`` writes them (``data_dir/<split>/*.tar``), or
timm's hub layout: ``data_dir/*-<split>-*.tar`` in one folder, the files listed in ``_info.json`` when it has the
split (``val`` also finds ``validation``). Each sample is a ``__key__`` with an image member (``jpg``, ``jpeg``,
``png``, ``webp``) and a ``cls`` member holding the integer label, webdataset's naming: the key is the member
path up to the first dot of its file name, the extension the rest.

The index holds, per sample, the shard, the image member's byte offset and size and the label, found by reading
the tar headers (and the few bytes of each ``cls``) once, on rank 0 (:mod:`xcit.data.index_cache`), with a small
header parser (:func:`tar_members`; ``tarfile`` is ten times slower on the pax headers webdataset writes). Item
``i`` is then one ``pread`` of its bytes, so :class:`xcit.data.sampler.ResumableSampler`'s order, the per-sample
augmentation seeds and bit-identical mid-epoch resume hold exactly as for folders. Class names come from
``classes.json`` beside the shards (``xcit shard`` writes it), else ``_info.json``'s ``classes``, else the labels
as strings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .imageio import decode_rgb
from .readers import Listing

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "ppm", "bmp", "pgm", "tif", "tiff", "jfif", "gif")
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")  # webdataset's base_plus_ext
_FDS: OrderedDict[str, int] = OrderedDict()  # this process's open shard files, newest last
_FDS_PID = [os.getpid()]
MAX_OPEN_SHARDS = 64  # timm's ImageNet has 1,024 training shards: stay well below the usual 1,024-descriptor limit


def _shard_fd(path: str) -> int:
    """A read-only descriptor of ``path``, from a small per-process cache (``pread`` needs no file position, but a
    forked worker still opens its own)."""
    if _FDS_PID[0] != os.getpid():
        for fd in _FDS.values():
            os.close(fd)  # the parent's copies, inherited by fork
        _FDS.clear()
        _FDS_PID[0] = os.getpid()
    fd = _FDS.pop(path, None)
    if fd is None:
        fd = os.open(path, os.O_RDONLY)
        if len(_FDS) >= MAX_OPEN_SHARDS:
            os.close(_FDS.popitem(last=False)[1])
    _FDS[path] = fd
    return fd


def _read_json(path: Path) -> dict | list | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def split_shards(root: Path, split: str) -> list[Path]:
    """The shard files of ``split`` under ``root`` (empty when there are none)."""
    info = _read_json(root / "_info.json") or {}
    for name in dict.fromkeys([split, "validation" if split == "val" else split]):
        tars = sorted((root / name).glob("*.tar")) if (root / name).is_dir() else []
        listed = info.get("splits", {}).get(name, {}).get("filenames") if isinstance(info, dict) else None
        tars = tars or [root / f for f in listed or []] or sorted(root.glob(f"*-{name}-*.tar"))
        if tars:
            return tars
    return []


def class_names(shards: list[Path], num_labels: int) -> list[str]:
    """``classes.json`` (a list) beside the shards or above them, else ``_info.json``'s ``classes``, else labels."""
    for d in dict.fromkeys([shards[0].parent, shards[0].parent.parent]):
        names = _read_json(d / "classes.json")
        info = _read_json(d / "_info.json")
        names = names if isinstance(names, list) else (info or {}).get("classes") if isinstance(info, dict) else None
        if isinstance(names, list) and len(names) >= num_labels:
            return [str(n) for n in names]
    return [str(i) for i in range(num_labels)]


def shards_key(shards: list[Path]) -> dict:
    """What a shard index depends on: each file's path, size and modification time."""
    stats = [(str(p), *(lambda s: (s.st_size, s.st_mtime_ns))(os.stat(p))) for p in shards]
    return {"version": 1, "kind": "wds", "split": os.path.commonpath([str(p.parent) for p in shards]), "files": stats}


def _number(field: bytes) -> int:
    """A tar header number: octal text, or base-256 when the top bit is set (GNU, for sizes of 8 GiB and more)."""
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big")
    return int(field.strip(b"\0 ") or b"0", 8)


def _pax(data: bytes) -> dict[str, str]:
    """POSIX pax extended-header records (``"%d %s=%s\\n"``), as webdataset's writer emits for every member."""
    out, i = {}, 0
    while i < len(data):
        space = data.index(b" ", i)
        length = int(data[i:space])
        key, _, value = data[space + 1 : i + length - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "replace")
        i += length
    return out


def tar_members(path: Path):
    """``(name, data offset, size)`` of every regular file in an uncompressed tar, from its headers alone: one
    ``pread`` per header (about 10x faster than ``tarfile`` on webdataset's pax headers). Handles ustar prefixes,
    pax ``path``/``size`` records and GNU long names."""
    fd = os.open(path, os.O_RDONLY)
    try:
        end, off, pax, long_name = os.fstat(fd).st_size, 0, {}, None
        while off + 512 <= end:
            h = os.pread(fd, 512, off)
            if not h.strip(b"\0"):
                break  # the end-of-archive zero blocks
            size, kind, data = _number(h[124:136]), h[156:157], off + 512
            if kind in (b"x", b"L", b"g"):
                body = os.pread(fd, size, data)
                if kind == b"x":
                    pax = _pax(body)
                elif kind == b"L":
                    long_name = body.rstrip(b"\0").decode("utf-8", "replace")
                off = data + (size + 511) // 512 * 512
                continue
            size = int(pax.get("size", size))
            prefix = h[345:500].split(b"\0", 1)[0] if h[257:262] == b"ustar" else b""
            name = h[:100].split(b"\0", 1)[0]
            name = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
            if kind in (b"0", b"\0", b"7"):
                yield pax.get("path") or long_name or name, data, size
            pax, long_name = {}, None
            off = data + (size + 511) // 512 * 512
    finally:
        os.close(fd)


def _index_shard(path: Path, listing: Listing) -> tuple[list[str], list[int], list[int], list[int]]:
    """``(keys, offsets, sizes, labels)`` of the complete samples of one shard."""
    samples: dict[str, dict] = {}
    fd = os.open(path, os.O_RDONLY)
    try:
        for name, offset, size in tar_members(path):
            match = _KEY_EXT.match(name)
            if match is None:
                continue
            key, ext = match.group(1), match.group(2).lower()
            s = samples.setdefault(key, {})
            if ext in IMAGE_EXTS and "image" not in s:
                s["image"] = (offset, size, ext)
            elif ext == "cls":
                s["cls"] = os.pread(fd, min(size, 64), offset)
    finally:
        os.close(fd)
    keys, offsets, sizes, labels = [], [], [], []
    for key, s in samples.items():
        try:
            label = int(s["cls"])
            offset, size, ext = s["image"]
        except (KeyError, ValueError):
            listing.not_images.append(f"{path}:{key} (needs an image and an integer cls member)")
            continue
        keys.append(f"{key}.{ext}")
        offsets.append(offset)
        sizes.append(size)
        labels.append(label)
    return keys, offsets, sizes, labels


@dataclass
class ShardSource:
    """A split of tar shards: per sample its shard, byte range and label."""

    root: Path
    classes: list[str]
    found_classes: list[str]
    shards: list[str]
    shard: np.ndarray  # int32 index into shards
    offsets: np.ndarray  # int64
    sizes: np.ndarray  # int64
    keys: np.ndarray  # bytes: member name, for messages
    targets: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.targets)

    def name(self, i: int) -> str:
        return f"{self.shards[self.shard[i]]}:{self.keys[i].decode()}"

    def read(self, i: int) -> bytes:
        path = os.path.join(self.root, self.shards[self.shard[i]])
        return os.pread(_shard_fd(path), int(self.sizes[i]), int(self.offsets[i]))

    def load(self, i: int, mode: str = "RGB"):
        return decode_rgb(self.read(i), self.name(i), mode=mode)

    def subset(self, keep) -> ShardSource:
        keep = np.asarray(keep, dtype=np.int64)
        return ShardSource(self.root, self.classes, self.found_classes, self.shards, self.shard[keep],
                           self.offsets[keep], self.sizes[keep], self.keys[keep], self.targets[keep])  # fmt: skip


def list_shards(shards: list[Path]) -> dict[str, object]:
    """Index ``shards`` (one pass over the tar headers): ``{"source": ShardSource, "listing": Listing}``."""
    from .readers import encode_paths

    listing = Listing()
    root = Path(os.path.commonpath([str(p.parent) for p in shards]))
    parts = [_index_shard(p, listing) for p in shards]
    shard = np.concatenate([np.full(len(k), i, dtype=np.int32) for i, (k, *_) in enumerate(parts)])
    keys, offsets, sizes, labels = ([x for part in parts for x in part[j]] for j in range(4))
    targets = np.asarray(labels, dtype=np.int64)
    names = class_names(shards, int(targets.max()) + 1 if len(targets) else 0)
    source = ShardSource(root, names, names, [os.path.relpath(p, root) for p in shards], shard,
                         np.asarray(offsets, dtype=np.int64), np.asarray(sizes, dtype=np.int64), encode_paths(keys),
                         targets)  # fmt: skip
    return {"source": source, "listing": listing}


# ----------------------------------------------------------------------------------------------------------------------
# Writing: xcit shard
# ----------------------------------------------------------------------------------------------------------------------


def parse_size(text: str) -> int:
    """``1GB``, ``500MB``, ``64KiB`` or a byte count -> bytes (decimal units for B/KB/MB/GB, binary for KiB...)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
    units |= {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    m = re.fullmatch(r"\s*([0-9.]+)\s*([A-Za-z]*)\s*", text)
    if m is None or m.group(2).upper() not in units or float(m.group(1)) <= 0:
        raise ValueError(f"bad size {text!r}: give bytes or a number with B, KB, MB, GB, TB, KiB, MiB, GiB")
    return int(float(m.group(1)) * units[m.group(2).upper()])


def write_shards(source, out_dir: Path, split: str, max_size: int, seed: int = 0, progress: bool = True) -> dict:
    """Write ``source`` (an ImageFolder split) as ``out_dir/<split>/<split>-NNNNNN.tar`` with webdataset's
    ``ShardWriter``: each sample is the original file's bytes under its extension, its label as ``cls`` and its
    path as ``json``, in a seeded random order (streaming readers such as timm's read shards in sequence and only
    shuffle within a buffer). Returns the split's counts."""
    import webdataset as wds
    from tqdm import tqdm

    (out_dir / split).mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(source))
    pattern = str(out_dir / split / f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxsize=max_size, maxcount=10**9, verbose=0) as sink:
        for n, i in enumerate(tqdm(order, desc=f"shard {split}", unit="img", disable=None if progress else True)):
            rel = source.paths[i].decode()
            ext = os.path.splitext(rel)[1].lower().lstrip(".") or "jpg"
            data = Path(source.path(i)).read_bytes()
            sink.write({"__key__": f"{split}_{n:08d}", ext: data, "cls": int(source.targets[i]),
                        "json": {"path": rel}})  # fmt: skip
        shards = sink.shard
    return {"split": split, "images": len(source), "shards": shards}


# ``xcit shard`` writes a new set beside the old one in a hidden folder, then swaps (never into a folder in use)
STAGING_PREFIX = ".xcit-shard-"


def shard_set(out_dir: Path) -> list[Path]:
    """What makes up a shard set in ``out_dir``: ``classes.json``, ``_info.json``, loose ``*.tar`` and every visible
    sub-folder holding ``.tar`` files (a split). Empty for a missing or shard-free folder."""
    if not out_dir.is_dir():
        return []
    found = []
    for p in sorted(out_dir.iterdir()):
        if p.name.startswith("."):
            continue
        if p.is_dir() and any(p.glob("*.tar")):
            found.append(p)
        elif p.is_file() and (p.suffix == ".tar" or p.name in ("classes.json", "_info.json")):
            found.append(p)
    return found


def check_split_folders(out_dir: Path, splits: list[str]) -> None:
    """Refuse to replace an ``out_dir/<split>`` that holds anything but shards (an image folder, say): replacing it
    would delete those files."""
    for split in splits:
        folder = out_dir / split
        if folder.is_dir():
            other = [p.name for p in folder.iterdir() if not (p.is_file() and p.suffix == ".tar")]
            if other:
                raise ValueError(f"{folder} holds files that are not shards ({', '.join(sorted(other)[:5])}); "
                                 f"write the shards to another folder")  # fmt: skip


def staging_folder(out_dir: Path) -> Path:
    """A fresh hidden folder in ``out_dir`` for a new shard set (readers never look at hidden folders); folders
    left by an interrupted earlier run are removed first."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob(STAGING_PREFIX + "*"):
        shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=STAGING_PREFIX + "new-", dir=out_dir))


def swap_in(out_dir: Path, staged: Path) -> None:
    """Replace ``out_dir``'s shard set (:func:`shard_set`) by the complete set in ``staged``.

    The old set is first moved aside into a hidden folder, then the new one is moved in, with one ``rename`` per
    split folder (instant on one file system): the two sets never mix. An interrupted swap leaves the old set
    whole in ``.xcit-shard-old-*``, which no reader looks at (and the next run removes); ``classes.json`` moves
    last, so a set without it is an incomplete one.
    """
    old = Path(tempfile.mkdtemp(prefix=STAGING_PREFIX + "old-", dir=out_dir))
    for p in shard_set(out_dir):
        os.replace(p, old / p.name)
    new = sorted(staged.iterdir(), key=lambda p: p.name == "classes.json")
    for p in new:
        os.replace(p, out_dir / p.name)
    staged.rmdir()
    shutil.rmtree(old)
