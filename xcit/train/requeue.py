"""A requeued SLURM job resumes by itself, or says why it cannot.

SLURM counts a job's requeues in ``SLURM_RESTART_COUNT`` (a preemption, a time limit's warning signal followed by
``scontrol requeue``, or an administrator's ``scontrol requeue``). A job with a count above 0 resumes from the newest
good checkpoint of its ``ckpt_save_dir`` without ``--resume``, as a torchrun restart does.

When the job stops on a signal, rank 0 writes ``requeue.json`` beside the checkpoint it has just saved: the job id,
its requeue count and the checkpoint's step. The requeued run checks what it finds against that record, so that a
job whose checkpoint is gone does not silently start over and loop: the checkpoint written before the requeue must
still load (missing or corrupt -> one error line, and the job is not requeued again), and the config must be the one
the checkpoint was trained with (a YAML file edited while the job waited in the queue). A job stopped before it
wrote any checkpoint leaves no record and simply starts again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from ..config.train_config import ConfigError
from ..runtime.fileio import atomic_write
from ..runtime.preemption import slurm_restart_count

log = logging.getLogger("xcit")

RECORD_NAME = "requeue.json"
# keys that may differ between a job's runs without changing what it trains
_FREE_KEYS = frozenset({"resume", "log_interval", "dist_timeout", "num_parallel_workers"})


def slurm_job() -> str | None:
    """This process's SLURM job id, or None outside SLURM."""
    return os.environ.get("SLURM_JOB_ID") or None


def write_record(out: Path, step: int, checkpoint: Path) -> None:
    """Record, on rank 0 inside a SLURM job, the checkpoint a stopped job will resume from (nothing outside SLURM)."""
    job = slurm_job()
    if job is None:
        return
    record = {"slurm_job": job, "restart": slurm_restart_count(), "step": step, "checkpoint": checkpoint.name}
    atomic_write(out / RECORD_NAME, lambda tmp: tmp.write_text(json.dumps(record) + "\n"))


def read_record(out: Path) -> dict | None:
    """This job's record in ``out`` (None when there is none, or it is another job's)."""
    try:
        record = json.loads((out / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or str(record.get("slurm_job")) != slurm_job():
        return None
    return record


def check_resume(out: Path, found: tuple[Path, dict] | None, config: dict) -> None:
    """Raise :class:`ConfigError` when a requeued job cannot continue where it stopped: the checkpoint it wrote
    before the requeue is missing or corrupt (``found`` is older or None), or ``config`` differs from the one that
    checkpoint was trained with."""
    record = read_record(out)
    restarts = slurm_restart_count()
    if record is not None:
        step = int(found[1].get("step", -1)) if found is not None else -1
        if step < int(record["step"]):
            newest = f"the newest good one is {found[0].name} at step {step}" if found else "no good one is left"
            raise ConfigError(
                f"requeued SLURM job {record['slurm_job']} cannot resume: the checkpoint {out / record['checkpoint']} "
                f"(step {record['step']}) that it wrote before requeue {restarts} is missing or corrupt, and "
                f"{newest}; not requeued again. Restore it, or start over with another ckpt_save_dir"
            )
    if found is not None:
        changed = changed_keys(found[1].get("config") or {}, config)
        if changed:
            raise ConfigError(
                f"requeued SLURM job {slurm_job()} cannot resume from {found[0]}: its config changed while it was "
                f"queued ({'; '.join(changed)}); not requeued again. Put the config back, or submit a new job"
            )


def changed_keys(saved: dict, current: dict, limit: int = 5) -> list[str]:
    """``key: saved -> current`` for the config keys that differ (at most ``limit``; keys in ``_FREE_KEYS`` and keys
    an older checkpoint does not record are left out)."""
    keys = sorted(k for k in current if k in saved and k not in _FREE_KEYS and saved[k] != current[k])
    out = [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in keys[:limit]]
    return out + ([f"{len(keys) - limit} more"] if len(keys) > limit else [])
