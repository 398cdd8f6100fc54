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

Inside a SLURM job the lock also records the job id and its requeue count (``SLURM_JOB_ID``,
``SLURM_RESTART_COUNT``). A requeued job restarts on whichever node SLURM gives it, and its earlier run may have
left its lock behind (SIGKILL after ``KillWait``, a lost node): the same job takes over its own lock from an earlier
run of itself, on any host. Any other job or run is still refused. A lock of another SLURM job on another host is
checked with ``squeue``: a job that SLURM no longer runs holds nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from ..config.train_config import ConfigError
from ..runtime import distributed
from ..runtime.preemption import slurm_restart_count
from ..runtime.procinfo import boot_id, pid_alive, start_ticks

log = logging.getLogger("xcit")

LOCK_NAME = "run.lock"


def _me() -> dict:
    me = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "boot_id": boot_id(),
        "start_ticks": start_ticks(os.getpid()),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }
    if os.environ.get("SLURM_JOB_ID"):
        me.update(slurm_job=os.environ["SLURM_JOB_ID"], slurm_restart=slurm_restart_count())
    return me


def owner_alive(owner: dict) -> bool | None:
    """Whether the recorded owner still runs: True/False on this host; for another host, whether its SLURM job
    still runs (``squeue``), else None (cannot tell)."""
    if owner.get("host") != socket.gethostname():
        return slurm_job_active(str(owner["slurm_job"])) if owner.get("slurm_job") else None
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0 or not pid_alive(pid):
        return False
    if owner.get("boot_id") and owner["boot_id"] != boot_id():
        return False  # rebooted since: the pid is someone else's
    ticks = owner.get("start_ticks")
    return ticks is None or start_ticks(pid) in (None, ticks)


def slurm_job_active(job_id: str) -> bool | None:
    """Whether SLURM still has the job (pending, running, requeued, completing...): ``squeue`` lists only those.
    None when SLURM cannot be asked from here."""
    if not shutil.which("squeue"):
        return None
    try:
        proc = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:  # "Invalid job id specified": SLURM has forgotten it (MinJobAge after it ended)
        return False if "invalid job id" in proc.stderr.lower() else None
    return bool(proc.stdout.strip())


def own_earlier_run(owner: dict, me: dict) -> bool:
    """Whether ``owner`` is an earlier run of this same SLURM job (it was requeued since: a higher restart count)."""
    job = me.get("slurm_job")
    if not job or str(owner.get("slurm_job")) != job:
        return False
    return int(owner.get("slurm_restart") or 0) < int(me.get("slurm_restart") or 0)


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
                self._clear_stale(me)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(me) + "\n")
            self.owner = me
            return self
        raise ConfigError(f"{self.path}: could not take the run lock (another run keeps taking it)")

    def _clear_stale(self, me: dict) -> None:
        """Remove the lock file if its owner is gone or an earlier run of this SLURM job; raise if it runs (or may
        run, on another host)."""
        try:
            owner = json.loads(self.path.read_text() or "{}")
        except FileNotFoundError:
            return  # released meanwhile
        except (OSError, ValueError):
            owner = {}
        if not isinstance(owner, dict):
            owner = {}
        who = f"pid {owner.get('pid')} on {owner.get('host')}, started {owner.get('started')}"
        if owner.get("slurm_job"):
            who = f"SLURM job {owner['slurm_job']}, {who}"
        if owner and own_earlier_run(owner, me):
            log.warning("notice: taking over the run lock %s of this SLURM job's run before its requeue (%s)",
                        self.path, who)  # fmt: skip
            self.path.unlink(missing_ok=True)
            return
        alive = owner_alive(owner) if owner else False  # an empty or torn file: its writer died mid-write
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
