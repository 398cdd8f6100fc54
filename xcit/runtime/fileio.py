"""Atomic file writes: the one way this package writes a file that a reader may open while it is being written.

The data goes to a temp file in the same directory (``.<name>.tmp<pid>``), is fsynced, renamed onto the target with
``os.replace`` (atomic on POSIX), and the directory is fsynced so that the rename itself survives a power cut. On any
failure the temp file is removed and an existing target is left as it was.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def temp_path(path: Path) -> Path:
    """Where :func:`atomic_write` stages ``path`` (the pid lets a later run remove a dead writer's leftovers)."""
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def atomic_write(path: str | os.PathLike, write_fn: Callable[[Path], object]) -> None:
    """Call ``write_fn(tmp_path)``, then make the file appear at ``path`` in one step: readers never see a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        write_fn(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        if e.filename is None:  # a full disk says only "No space left on device": name the file
            raise OSError(e.errno, f"cannot write {path}: {e.strerror or e}") from e
        raise
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; a no-op where directories cannot be opened (the rename is atomic)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def check_writable_dir(directory: str | os.PathLike, what: str = "output") -> Path:
    """Create ``directory`` (and its parents) and prove a file can be created in it, before any work that would
    write there: a read-only, full or missing folder (or a file in its place) is an ``OSError`` naming the folder,
    raised now instead of after the work. A probe file is written and removed, since ``os.access`` says yes to
    root on a read-only mount."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".write-test{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"x")
        probe.unlink()
    except OSError as e:
        blocking = next((p for p in (directory, *directory.parents) if p.exists()), None)
        why = f"{blocking} is a file, not a folder" if blocking and not blocking.is_dir() else e.strerror or str(e)
        raise OSError(f"cannot write the {what} in {directory}: {why}") from None
    return directory
