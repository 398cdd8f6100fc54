"""Stopping a training run cleanly: preemption signals, torchrun elastic restarts, and dead or hung ranks.

* **SIGTERM / SIGINT** (a scheduler's preemption notice, ``torchrun`` shutting down, Ctrl-C) only set a flag. The
  training loop checks it after each optimiser step, where the state is consistent, saves a checkpoint there and
  raises :class:`Preempted`. Saving inside the handler could catch the optimiser half way through an update. In
  a distributed run the ranks agree on the flag with an all-reduce each step, so they all stop at the same step.
  A second signal stops at once (``KeyboardInterrupt``).
* **DataLoader workers ignore both signals** (:func:`worker_ignores_stop_signals`): a signal sent to the whole
  process group (Ctrl-C, ``scancel``) would otherwise kill them first, and the main process would die on "worker
  exited unexpectedly" before it could save.
* **SLURM's warning signal** (``sbatch --signal=USR2@90``, submitit's default and ``xcit submit``'s; sent to every
  task of the job's steps before its time limit, or by ``scancel --signal=USR2`` to simulate a preemption) is a
  stop signal too inside a SLURM job, handled as SIGTERM is. submitit's own handler would call a ``checkpoint()``
  hook in rank 0's signal handler alone, in the middle of a step; this stops every rank at the same step instead,
  and the caller requeues the job (:mod:`xcit.cli.submit`). ``scontrol requeue`` and preemption send SIGTERM
  (then SIGKILL after ``KillWait``), which the same stop covers.
* **Elastic restarts**: ``torchrun --max_restarts N`` restarts every rank after a failure and counts the restarts in
  ``TORCHELASTIC_RESTART_COUNT``; a restarted run resumes from the newest good checkpoint by itself, as does a
  requeued SLURM job (``SLURM_RESTART_COUNT``).
* **Dead or hung ranks**: a collective with a dead peer fails at once (gloo: connection reset) or after the process
  group's ``timeout`` (a hung peer; NCCL's watchdog with ``TORCH_NCCL_ASYNC_ERROR_HANDLING``).
  :func:`exit_on_peer_failure` turns that into one clear line and exits without the abort that tearing down a
  process group with a dead peer causes.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import NoReturn

import torch
import torch.distributed as dist

log = logging.getLogger("xcit")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
SLURM_WARNING_SIGNAL = signal.SIGUSR2  # submitit's default (SUBMITIT_PREEMPT_SIGNAL); xcit submit's --signal


def stop_signals(environ: dict | None = None) -> tuple[signal.Signals, ...]:
    """SIGTERM and SIGINT; inside a SLURM job (``SLURM_JOB_ID`` set) also SLURM's warning signal, SIGUSR2."""
    env = os.environ if environ is None else environ
    return STOP_SIGNALS + ((SLURM_WARNING_SIGNAL,) if "SLURM_JOB_ID" in env else ())


class Preempted(Exception):
    """Training stopped on a signal after saving ``checkpoint`` (``None`` on ranks that do not write files)."""

    def __init__(self, signum: int, checkpoint: str | None) -> None:
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; checkpoint {checkpoint}" if checkpoint else f"stopped by {name}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention for "ended by signal N"


class StopSignal:
    """Context manager: while active, the :func:`stop_signals` set :attr:`signum` instead of ending the process."""

    def __init__(self, signals: tuple[int, ...] | None = None) -> None:
        self.signum: int | None = None
        self.signals = stop_signals() if signals is None else tuple(signals)
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():  # signal handlers live in the main thread only
            for sig in self.signals:
                self._previous[sig] = signal.signal(sig, self._handle)
            if hasattr(signal, "SIGXFSZ"):  # a file-size limit: let write() fail with EFBIG, reported, not killed
                self._previous[signal.SIGXFSZ] = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping without a checkpoint")
        self.signum = signum
        log.warning(
            "%s received: finishing this step, saving a checkpoint, then stopping (send it again to stop at once)",
            signal.Signals(signum).name,
        )

    def agreed(self, device: torch.device) -> int:
        """The signal any rank received (0 if none); a collective in a distributed run, so call it on every rank."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.signum or 0
        flag = torch.tensor([self.signum or 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


def worker_ignores_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: leave SIGTERM/SIGINT (and SLURM's SIGUSR2, which SLURM sends to every process
    of a step, and which would end a worker) to the main process, which stops the workers itself."""
    for sig in (*STOP_SIGNALS, SLURM_WARNING_SIGNAL):
        signal.signal(sig, signal.SIG_IGN)


def elastic_restart_count() -> int:
    """How many times torchrun has restarted this job (0 on the first attempt or without torchrun)."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)


def slurm_restart_count() -> int:
    """How many times SLURM has requeued this job (``SLURM_RESTART_COUNT``; 0 on its first run or outside SLURM)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def is_peer_failure(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another rank died, hung or became unreachable."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return False
    if isinstance(e, getattr(dist, "DistError", ())):
        return True
    text = str(e)
    markers = ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out", "timed out", "Broken pipe")
    return isinstance(e, RuntimeError) and any(m in text for m in markers)


def exit_on_peer_failure(e: BaseException, prog: str = "xcit train") -> NoReturn:
    """Report a dead or hung rank in one line and end the process with status 1.

    ``os._exit`` skips the process group's destructor, which aborts ("terminate called ...") when a peer is gone.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    log.error(
        "%s: error: rank %d lost contact with another rank, which died, was killed or hangs (%s). "
        "Check that rank's log. Under torchrun --max_restarts the job restarts and resumes from the newest "
        "checkpoint; otherwise resume with --resume auto.",
        prog,
        rank,
        first,
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)
