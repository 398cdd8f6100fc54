"""One training run per output folder: a lock file in ``ckpt_save_dir`` that names its owner.

Two runs writing into one folder would interleave ``train.log`` and ``metrics.csv`` and overwrite each other's
checkpoints. Rank 0 creates ``ckpt_save_dir/run.lock`` with ``O_CREAT | O_EXCL`` before it writes anything; the
file records the owner's host, pid, boot id, the process's start time (kernel clock ticks since boot, from
``/proc/PID/stat``) and the wall-clock time it started. A second run finds it, sees the owner alive and stops
with one line, touching nothing.

An owner that died without cleaning up (SIGKILL, a lost node) leaves the file behind. On the same host it is stale
when no process has that pid, or the pid now belongs to another process (another start time) or the machine has
rebooted since (another boot id); a stale lock is taken over with a notice. A lock from another host cannot be
checked from here: the error says which host holds it and that deleting the file releases it. The lock is removed
when the run ends, whether it finishes, fails or is stopped by a signal. Checking and taking over happen under an
``flock`` of the folder, so two runs that find the same stale lock at once cannot both take it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from ..config.train_config import ConfigError
from ..runtime import distributed

log = logging.getLogger("xcit")

LOCK_NAME = "run.lock"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after "(comm)": state is field 3, starttime 22


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def _me() -> dict:
    return {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "boot_id": _boot_id(),
        "start_ticks": _start_ticks(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def owner_alive(owner: dict) -> bool | None:
    """Whether the recorded owner still runs: True/False on this host, None for another host (cannot tell)."""
    if owner.get("host") != socket.gethostname():
        return None
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not _alive(pid):
        return False
    if owner.get("boot_id") and owner["boot_id"] != _boot_id():
        return False  # rebooted since: the pid is someone else's
    ticks = owner.get("start_ticks")
    return ticks is None or _start_ticks(pid) in (None, ticks)


@contextlib.contextmanager
def _folder_guard(directory: Path):
    """An exclusive ``flock`` of the folder for the few milliseconds of check-and-take (released on exit)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class RunLock:
    """The lock of ``directory``; :meth:`acquire` takes it, :meth:`release` (or leaving the ``with``) drops it."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.path = Path(directory) / LOCK_NAME
        self.owner: dict | None = None

    def acquire(self) -> RunLock:
        """Take the lock, taking over a stale one with a notice. Raises :class:`ConfigError` when in use."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with _folder_guard(self.path.parent):
            return self._acquire(_me())

    def _acquire(self, me: dict) -> RunLock:
        for _ in range(3):  # a stale lock removed, or another run's lock released, meanwhile: try again
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                self._clear_stale()
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.owner = me
            return self
        raise ConfigError(f"{self.path}: could not take the run lock (another run keeps taking it)")

    def _clear_stale(self) -> None:
        """Remove the lock file if its owner is gone; raise if it runs (or may run, on another host)."""
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError):
            owner = {}
        if not isinstance(owner, dict):
            owner = {}
        alive = owner_alive(owner) if owner else False  # an empty or torn file: its writer died mid-write
        who = f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
        if alive:
            raise ConfigError(
                f"{self.path.parent} is in use by another training run ({who}): use another ckpt_save_dir, or "
                f"wait for that run to end"
            )
        if alive is None:
            raise ConfigError(
                f"{self.path.parent} is locked by a training run on another host ({who}); if that run has ended, "
                f"delete {self.path}"
            )
        log.warning("notice: taking over the run lock %s of a run that is no longer running (%s)", self.path,
                    who if owner else "no owner recorded")  # fmt: skip
        self.path.unlink(missing_ok=True)

    def release(self) -> None:
        """Remove the lock file if it is still this process's."""
        if self.owner is None:
            return
        try:
            if json.loads(self.path.read_text()) == self.owner:
                self.path.unlink()
        except (OSError, ValueError):
            pass
        self.owner = None

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def hold_run_lock(directory: str | os.PathLike, is_main: bool) -> RunLock | contextlib.nullcontext:
    """Rank 0 takes ``directory``'s lock (a context manager that releases it); every rank raises
    :class:`ConfigError` when it is in use (a collective under torchrun: call it on every rank)."""
    lock, error = RunLock(directory), None
    if is_main:
        try:
            lock.acquire()
        except ConfigError as e:
            error = str(e)
    error = distributed.broadcast_object(error)
    if error:
        raise ConfigError(error)
    return lock if is_main else contextlib.nullcontext()
