"""Lower a service process's CPU priority (for work that can wait, such as crowd labeling).

Two Linux details decide whether a nice value has any effect against the *other* services:

- Nice is per thread on Linux; `setpriority(PRIO_PROCESS, 0, n)` changes the calling thread only,
  and threads started later inherit it from the thread that starts them. So every thread the
  process already has (a library may start some at import) is lowered, first thing at start-up.
- With the scheduler's autogroups on (`/proc/sys/kernel/sched_autogroup_enabled` = 1, the default
  on desktop and many server kernels) and the process in the root CPU cgroup, CPU time is first
  shared *between sessions* (autogroups), and a thread's nice only orders it within its own
  session. `./pt up` starts every service in its own session, so there the session's
  autogroup nice (`/proc/self/autogroup`) is what counts. It is written only when this process
  leads its session, so a service started by hand from a shell never lowers the shell's session.

Raising priority back needs CAP_SYS_NICE; lowering it never does. In a container with its own CPU
cgroup, autogroups do not apply and the thread nice orders the container's processes; between
containers use CPU shares (deploy/).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

AUTOGROUP_SWITCH = Path("/proc/sys/kernel/sched_autogroup_enabled")
AUTOGROUP = Path("/proc/self/autogroup")  # "/autogroup-123 nice 0": this session's group


@dataclass(frozen=True)
class Applied:
    thread_nice: int
    autogroup_nice: int | None  # None: autogroups off, or not this process's own session


def _autogroup_nice() -> int | None:
    try:
        return int(AUTOGROUP.read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return None


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:  # no /proc: this thread only
        return [0]


def lower_cpu_priority(nice: int) -> Applied:
    """Run this process at `nice` (0-19; never raised above what it already is): every thread it
    has now, and so every thread they start. Call early, before the service starts its own threads.
    Returns what was applied; logs and carries on where the OS refuses the session's group."""
    if not 0 <= nice <= 19:
        raise ValueError(f"nice must be 0..19, got {nice}")
    for tid in _threads():  # libraries may have started threads at import (OpenBLAS does)
        try:
            if nice > os.getpriority(os.PRIO_PROCESS, tid):
                os.setpriority(os.PRIO_PROCESS, tid, nice)
        except ProcessLookupError:  # that thread has ended
            pass
    group: int | None = None
    autogroups_on = AUTOGROUP_SWITCH.exists() and AUTOGROUP_SWITCH.read_text().strip() == "1"
    if nice and autogroups_on and os.getsid(0) == os.getpid():
        group = _autogroup_nice()
        if group is not None and nice > group:
            try:
                AUTOGROUP.write_text(str(nice))
                group = nice
            except OSError as exc:
                log.warning("cannot lower the session's CPU priority", extra={"error": repr(exc)})
    return Applied(os.getpriority(os.PRIO_PROCESS, 0), group)
