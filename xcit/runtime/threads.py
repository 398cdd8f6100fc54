"""How many threads a CPU run uses: the CPUs this process may actually run on, less what other processes keep busy.

torch starts one thread per core of the machine. Its OpenMP threads meet at a barrier after every operator, so when
another process holds one of the cores, every operator waits for the thread that shares it: on 2 cores with one
taken, 2 threads ran the demo at 22 img/s where 1 thread ran it at 296. So:

* available CPUs: the affinity mask (``taskset``, ``cpuset``) capped by a cgroup CPU quota (containers' ``--cpus``,
  cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``), rounded up;
* busy elsewhere: the CPU time other processes used on those CPUs, from ``/proc/stat`` less this process's own time
  (``/proc/self/stat``), sampled for a moment at start-up and over each epoch;
* threads = available - busy elsewhere (rounded), at least 1; a change is logged.

``OMP_NUM_THREADS`` (which torchrun sets to 1 for several processes per node) or ``XCIT_THREADS=N`` fixes the number
instead; ``XCIT_THREADS=auto`` (the default) chooses as above.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import torch

log = logging.getLogger("xcit")

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _affinity() -> set[int]:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def cgroup_quota(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """CPUs' worth of time the cgroup may use per period (cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``), or None."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None


def available_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by the cgroup quota (rounded up)."""
    n = len(_affinity())
    quota = cgroup_quota()
    return max(1, min(n, math.ceil(quota)) if quota else n)


def _busy_ticks(cpus: set[int]) -> int | None:
    """Busy clock ticks (all but idle and iowait) of ``cpus`` since boot, from ``/proc/stat``."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    total = 0
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus:
            v = [int(x) for x in fields[:8]]
            total += sum(v) - v[3] - v[4]  # user nice system idle iowait irq softirq steal
    return total


def _own_ticks() -> int:
    t = os.times()  # this process's threads; reaped children included
    return round((t.user + t.system + t.children_user + t.children_system) * _TICK)


class CpuThreads:
    """The thread count of a CPU run, chosen at start-up (:meth:`start`) and revised at each :meth:`adjust`."""

    def __init__(self) -> None:
        self.requested = os.environ.get("XCIT_THREADS", "auto")
        self.fixed = self.requested != "auto" or "OMP_NUM_THREADS" in os.environ
        self.cpus = _affinity()
        self.available = available_cpus()
        self._mark()

    def _mark(self) -> None:
        self._t, self._busy, self._own = time.monotonic(), _busy_ticks(self.cpus), _own_ticks()

    def busy_elsewhere(self) -> float | None:
        """CPUs' worth of time other processes used since the last mark."""
        busy, own, dt = _busy_ticks(self.cpus), _own_ticks(), time.monotonic() - self._t
        if busy is None or self._busy is None or dt <= 0:
            return None
        return max(0.0, (busy - self._busy - (own - self._own)) / _TICK / dt)

    def choose(self, busy: float | None) -> int:
        return max(1, min(self.available, round(self.available - (busy or 0.0))))

    @classmethod
    def start(cls, device: torch.device, sample_s: float = 0.3) -> CpuThreads | None:
        """For a CPU run: measure for ``sample_s`` and set the thread count (None on other devices)."""
        if device.type != "cpu":
            return None
        threads = cls()
        if threads.requested != "auto":
            torch.set_num_threads(max(1, int(threads.requested)))
        elif not threads.fixed:
            time.sleep(sample_s)
            threads.apply(threads.busy_elsewhere())
        log.info("threads: %d of %d available CPU(s)%s", torch.get_num_threads(), threads.available,
                 " (fixed by OMP_NUM_THREADS / XCIT_THREADS)" if threads.fixed else "")  # fmt: skip
        return threads

    def apply(self, busy: float | None) -> None:
        n = self.choose(busy)
        if n != torch.get_num_threads():
            log.info("threads: %d -> %d (other processes keep %.1f of %d CPU(s) busy)", torch.get_num_threads(), n,
                     busy or 0.0, self.available)  # fmt: skip
            torch.set_num_threads(n)
        self._mark()

    def adjust(self, every_s: float = 20.0) -> None:
        """Revise the count from what other processes used since the last revision, at most every ``every_s``
        seconds (call it after every step)."""
        if not self.fixed and time.monotonic() - self._t >= every_s:
            self.apply(self.busy_elsewhere())
