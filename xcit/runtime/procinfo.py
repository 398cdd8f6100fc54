"""Is a process still running, and is it still the same process: the checks behind stale lock files and temp files.

A pid alone is not an identity: after the process exits the kernel may give the number to another one, and after a
reboot every number is reused. ``/proc/PID/stat``'s start time (clock ticks since boot) and the boot id together
tell a reused pid from the original (proc(5)).
"""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def boot_id() -> str:
    """This boot's random id (``/proc/sys/kernel/random/boot_id``), or "" where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (``/proc/PID/stat`` field 22), or None if unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])  # fields after "(comm)": state is field 3, starttime 22
