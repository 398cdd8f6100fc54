"""Training checkpoints that survive crashes, full disks and bit rot.

A checkpoint is an ordinary ``torch.save`` zip archive whose zip *comment* holds ``xcit-sha256:<hex>``, the SHA-256
of every byte before the comment. A zip comment is part of the format (APPNOTE.TXT sec. 4.3.16), so
``torch.load(weights_only=True)`` and :func:`xcit.read_weights` read the file unchanged, while :func:`load_checkpoint`
can prove that the bytes are the ones that were written: a truncated file loses its comment, and a flipped bit
changes the digest. (Torch's own zip reader does not check tensor bytes, so a flipped bit would otherwise load.)

Writes are atomic: temp file in the same directory, fsync, ``os.replace``, fsync of the directory (the rename is
only durable once the directory entry is). A failed write (full disk, quota, I/O error) removes the temp file,
leaves the previous checkpoint untouched and raises :class:`CheckpointError`.

Everything stored must load with ``weights_only=True``: tensors, dicts, lists, tuples, str, int, float, bool, None.
:func:`capture_rng_state` encodes the Python, NumPy, torch and CUDA generators in those types.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import logging
import os
import random
import struct
from pathlib import Path

import numpy as np
import torch

from .errors import WeightsError
from .fileio import atomic_write
from .limits import check_zip_inflation
from .procinfo import pid_alive

log = logging.getLogger("xcit")

_TAG = b"xcit-sha256:"
_COMMENT_LEN = len(_TAG) + 64  # tag + hex digest
_EOCD = b"PK\x05\x06"  # end-of-central-directory signature; the record is 22 bytes when it has no comment
_CHUNK = 1 << 22


class CheckpointError(WeightsError):
    """A checkpoint that cannot be written, read or verified. The message names the file."""


# ----------------------------------------------------------------------------------------------------------------------
# Checksum trailer
# ----------------------------------------------------------------------------------------------------------------------


def _digest(f, length: int) -> str:
    """SHA-256 of the first ``length`` bytes of an open binary file, read in chunks (checkpoints can be GBs)."""
    f.seek(0)
    h = hashlib.sha256()
    left = length
    while left > 0:
        chunk = f.read(min(_CHUNK, left))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h.hexdigest()


def _seal(path: Path) -> None:
    """Turn the fresh ``torch.save`` archive at ``path`` into a sealed checkpoint by writing the digest comment."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 22)
        eocd = f.read(22)
        if size < 22 or eocd[:4] != _EOCD or eocd[20:22] != b"\x00\x00":
            raise CheckpointError(f"{path}: torch.save did not write a zip archive without comment; cannot seal it")
        digest = _digest(f, size - 2)  # everything up to the comment-length field
        f.seek(size - 2)
        f.write(struct.pack("<H", _COMMENT_LEN) + _TAG + digest.encode())
        f.flush()
        os.fsync(f.fileno())


def verify_checkpoint(path: str | os.PathLike) -> bool | None:
    """Check a file's checksum comment.

    Returns ``True`` when the stored digest matches the bytes, ``False`` when it does not, and ``None`` when the
    file has no checksum comment at all (written by plain ``torch.save``, or truncated).
    """
    with open(path, "rb") as f:
        return _seal_state(f)


def _seal_state(f) -> bool | None:
    """:func:`verify_checkpoint` on an open binary file (left at an arbitrary position)."""
    size = f.seek(0, os.SEEK_END)
    if size < 22 + _COMMENT_LEN:
        return None
    f.seek(size - _COMMENT_LEN - 2)
    tail = f.read(_COMMENT_LEN + 2)
    if tail[2 : 2 + len(_TAG)] != _TAG or struct.unpack("<H", tail[:2])[0] != _COMMENT_LEN:
        return None
    return _digest(f, size - _COMMENT_LEN - 2) == tail[2 + len(_TAG) :].decode("ascii", "replace")


SUPPORTED = (
    "PyTorch .pth/.pt (zip or legacy pickle, tensors only), .safetensors, MindSpore .ckpt, or a save_pretrained folder"
)


def load_torch_file(path: str | os.PathLike, require_seal: bool = False) -> tuple[object, bool | None]:
    """Read a ``.pth`` file once: its checksum (when it has one) is checked and its contents are loaded with
    ``torch.load(weights_only=True)`` from the same open file. Returns ``(object, sealed)``, ``sealed`` as in
    :func:`verify_checkpoint`. Raises :class:`CheckpointError` for a checksum mismatch (or no checksum, with
    ``require_seal``) and :class:`WeightsError`, naming the file, for anything that is not a readable tensors-only
    PyTorch file."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4)
        if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # neither torch's zip nor a pickle
            raise WeightsError(f"{path}: not a weight file of any supported format ({SUPPORTED})")
        check_zip_inflation(f, path)  # before torch extracts a member that inflates to gigabytes
        sealed = _seal_state(f)
        if sealed is False:
            raise CheckpointError(f"{path}: checksum mismatch, the file is corrupt (changed after it was written)")
        if sealed is None and require_seal:
            raise CheckpointError(f"{path}: no checksum; the file is truncated or was not written by save_checkpoint")
        f.seek(0)
        try:
            # DINO's checkpoints record their ``args`` as an argparse.Namespace (main_dino.py): that one plain class
            # is allowed, for this load only; anything else beyond tensors and containers is still refused
            with torch.serialization.safe_globals([argparse.Namespace]):
                return torch.load(f, map_location="cpu", weights_only=True), sealed
        except Exception as e:  # noqa: BLE001 - torch raises many types for bad files; all become one clear error
            raise _load_error(path, e) from None


def _load_error(path: Path, e: Exception) -> WeightsError:
    text = str(e)
    if "Weights only load failed" in text or "Unsupported global" in text or "UnpicklingError" in type(e).__name__:
        return WeightsError(
            f"{path}: refused to load. The file contains Python objects beyond tensors and plain containers, "
            f"which could run code when unpickled (loaded with weights_only=True). If you trust it, re-save its "
            f"state_dict with torch.save(model.state_dict(), ...)."
        )
    if "central directory" in text or "file_size" in text:  # torch's zip reader on a cut-off file
        return WeightsError(f"{path}: not a readable PyTorch file (truncated or corrupt zip archive)")
    first = (text.splitlines() or [""])[0][:200]
    return WeightsError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {first})")


# ----------------------------------------------------------------------------------------------------------------------
# Save / load
# ----------------------------------------------------------------------------------------------------------------------


class _RecordingWriter:
    """A file wrapper that remembers the ``OSError`` (ENOSPC, EFBIG, EIO, ...) that torch's writer hides."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        self.f.flush()


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """Atomically write ``state`` (weights_only-safe values only) to ``path`` with a SHA-256 checksum.

    On any failure the temp file is removed, an existing ``path`` is left as it was, and :class:`CheckpointError`
    says why (e.g. ``No space left on device``).
    """
    path = Path(path)
    _check_weights_only_safe(state, path, "state")
    writer = None

    def write(tmp: Path) -> None:
        nonlocal writer
        with open(tmp, "wb") as f:
            writer = _RecordingWriter(f)
            torch.save(state, writer)
        _seal(tmp)

    try:
        atomic_write(path, write)
    except (OSError, RuntimeError) as e:
        # torch's zip writer turns a failed write into "RuntimeError: unexpected pos"; report the OS's reason
        cause = writer.error if writer is not None and writer.error is not None else e
        text = cause.strerror if isinstance(cause, OSError) and cause.strerror else str(cause)
        reason = (text.splitlines() or [type(cause).__name__])[0][:200]
        raise CheckpointError(
            f"{path}: could not write the checkpoint ({reason}); the previous checkpoint, if any, is intact"
        ) from cause


# exactly the types torch.load(weights_only=True) rebuilds (numpy scalars and defaultdict are refused there)
_SAFE_SCALARS = (str, bytes, int, float, complex, bool, type(None), torch.dtype, torch.device)
_SAFE_CONTAINERS = (dict, collections.OrderedDict, list, tuple, set, torch.Size)


def _check_weights_only_safe(obj: object, path: Path, where: str) -> None:
    """Refuse, before writing, anything ``torch.load(weights_only=True)`` would refuse to read back."""
    kind = type(obj)
    if isinstance(obj, torch.Tensor) or kind in _SAFE_SCALARS or kind is torch.Size:
        return
    if kind not in _SAFE_CONTAINERS:
        raise CheckpointError(
            f"{path}: {where} is a {kind.__module__}.{kind.__name__}, which torch.load(weights_only=True) cannot "
            f"read; store tensors, plain numbers, strings, lists or dicts"
        )
    items = obj.items() if isinstance(obj, dict) else enumerate(obj)
    for k, v in items:
        if isinstance(obj, dict):
            _check_weights_only_safe(k, path, f"a key of {where}")
        _check_weights_only_safe(v, path, f"{where}[{k!r}]")


def load_checkpoint(path: str | os.PathLike, require_checksum: bool = False) -> dict:
    """Verify and load a checkpoint written by :func:`save_checkpoint` (``weights_only=True``, on CPU).

    A file without a checksum (plain ``torch.save``) is loaded with a warning unless ``require_checksum``.
    Raises ``FileNotFoundError`` or :class:`CheckpointError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        obj, sealed = load_torch_file(path, require_seal=require_checksum)
    except CheckpointError:
        raise
    except WeightsError as e:
        raise CheckpointError(str(e)) from None
    if sealed is None:
        log.warning("%s has no checksum (not written by xcit); loading it unverified", path)
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict, found {type(obj).__name__}")
    return obj


# ----------------------------------------------------------------------------------------------------------------------
# A directory of checkpoints
# ----------------------------------------------------------------------------------------------------------------------


def recorded_progress(path: str | os.PathLike) -> tuple[int, int] | None:
    """The ``(epoch, step)`` a training checkpoint records, or ``None`` (no such fields, or unreadable).

    Read with ``mmap``: the pickle is parsed, tensor bytes are not read, so it costs milliseconds for any size.
    """
    try:
        with open(path, "rb") as f:
            check_zip_inflation(f, path)
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable: no progress; latest_checkpoint reports the file when it gets there
        return None
    if isinstance(obj, dict) and type(obj.get("epoch")) is int and type(obj.get("step")) is int:
        return obj["epoch"], obj["step"]
    return None


def _newest_first(directory: Path, pattern: str) -> list[tuple[Path, tuple[int, int] | None]]:
    """``(file, recorded (epoch, step))`` for the files matching ``pattern``, the greatest progress first; files
    recording none (unreadable, truncated, not a training checkpoint) come last.

    Never by modification time: ``cp`` without ``-p``, ``rsync`` without ``-t`` or a ``touch`` would make an old
    checkpoint look new (and resuming from it would retrain finished steps, and pruning would delete newer ones).
    """
    files = [(p, recorded_progress(p)) for p in directory.glob(pattern) if p.is_file() and not p.name.startswith(".")]
    return sorted(files, key=lambda f: (*(f[1] or (-1, -1)), f[0].name), reverse=True)


def latest_checkpoint(directory: str | os.PathLike, pattern: str = "*.pth") -> Path | None:
    """The file in ``directory`` matching ``pattern`` with the greatest recorded (epoch, step) whose checksum
    verifies, or ``None``.

    Corrupt, unsealed or unreadable files are reported and skipped, so a crash or bit rot in the last checkpoint
    falls back to the previous good one. Files' modification times play no part.
    """
    for p in _candidates(directory, pattern):
        try:
            ok = verify_checkpoint(p)
        except OSError as e:
            log.warning("skipping checkpoint %s: unreadable (%s)", p, e)
            continue
        if ok:
            return p
        why = "checksum mismatch" if ok is False else "no checksum (truncated or not written by xcit)"
        log.warning("skipping corrupt checkpoint %s: %s; falling back to an older one", p, why)
    return None


def load_latest_checkpoint(directory: str | os.PathLike, pattern: str = "*.pth") -> tuple[Path, dict] | None:
    """:func:`latest_checkpoint` and :func:`load_checkpoint` in one read of the chosen file: ``(path, state)`` of
    the sealed checkpoint with the greatest recorded (epoch, step), or ``None``. Bad files are reported and
    skipped, as there."""
    for p in _candidates(directory, pattern):
        try:
            return p, load_checkpoint(p, require_checksum=True)
        except (OSError, CheckpointError) as e:
            log.warning("skipping corrupt checkpoint %s: %s; falling back to an older one", p,
                        str(e).removeprefix(f"{p}: "))  # fmt: skip
    return None


def _candidates(directory: str | os.PathLike, pattern: str) -> list[Path]:
    """The checkpoints recording progress, the greatest first; the others are reported."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    files = _newest_first(directory, pattern)
    for p, _ in (f for f in files if f[1] is None):
        log.warning("skipping checkpoint %s: no recorded (epoch, step) (unreadable, truncated or not written by "
                    "xcit train)", p)  # fmt: skip
    return [p for p, progress in files if progress is not None]


def prune_checkpoints(directory: str | os.PathLike, keep: int, pattern: str = "*.pth") -> list[Path]:
    """Delete all but the ``keep`` files matching ``pattern`` with the greatest recorded (epoch, step) (``keep <= 0``
    keeps all), plus temp files left behind by killed writers. Returns the deleted paths."""
    directory = Path(directory)
    removed = []
    for tmp in directory.glob(".*.tmp*"):  # from save_checkpoint of a process that no longer exists
        pid = tmp.name.rsplit(".tmp", 1)[-1]
        if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if keep > 0:
        for p, _ in _newest_first(directory, pattern)[keep:]:
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


# ----------------------------------------------------------------------------------------------------------------------
# Random number generators, encoded weights_only-safe
# ----------------------------------------------------------------------------------------------------------------------


def capture_rng_state() -> dict:
    """The state of Python's ``random``, NumPy's global generator, torch's CPU generator and every CUDA generator,
    as tensors, lists and numbers only (loadable with ``weights_only=True``)."""
    version, internal, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": [version, torch.tensor(internal, dtype=torch.int64), gauss],
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of :func:`capture_rng_state`. Missing entries are left alone; CUDA states are restored only for
    as many devices as both the checkpoint and this machine have."""
    if "python" in state:
        version, internal, gauss = state["python"]
        random.setstate((int(version), tuple(int(x) for x in internal.tolist()), gauss))
    if "numpy" in state:
        name, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "torch" in state:
        torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        n = min(len(state["cuda"]), torch.cuda.device_count())
        if n != len(state["cuda"]):
            log.warning("checkpoint has %d CUDA RNG states, this machine %d devices", len(state["cuda"]), n)
        for i in range(n):
            torch.cuda.set_rng_state(state["cuda"][i], i)
