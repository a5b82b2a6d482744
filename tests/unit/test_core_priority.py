"""services/core/priority.py, on the real scheduler: a service started in its own session (as
`./pt up` starts each one) at a lower priority really gets less CPU than one at the default,
which a thread nice alone does not achieve where the kernel groups CPU time by session."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from services.core.priority import AUTOGROUP_SWITCH, lower_cpu_priority

ROOT = Path(__file__).resolve().parents[2]

# A child that lowers its priority (or not), then spins on one pinned CPU for a fixed time and
# reports how many loop turns it got, with the nice values the kernel shows for it.
SPINNER = textwrap.dedent(
    """
    import json, os, sys, time
    from services.core.priority import lower_cpu_priority
    nice, cpu, start_at = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    applied = lower_cpu_priority(nice)
    os.sched_setaffinity(0, {cpu})
    group = open("/proc/self/autogroup").read().strip() if os.path.exists("/proc/self/autogroup") else ""
    while time.time() < start_at:
        time.sleep(0.005)
    turns, end = 0, start_at + 2.0
    while time.time() < end:
        turns += 1
    stat = open("/proc/self/stat").read().rsplit(")", 1)[1].split()
    print(json.dumps({"turns": turns, "applied": [applied.thread_nice, applied.autogroup_nice],
                      "proc_nice": int(stat[16]), "autogroup": group}))
    """
)


def spin(nice: int, cpu: int, start_at: float, new_session: bool) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", SPINNER, str(nice), str(cpu), str(start_at)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE,
        text=True,
        start_new_session=new_session,
    )


def result(proc: subprocess.Popen[str]) -> dict[str, object]:
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return json.loads(out)


def autogroups_on() -> bool:
    return AUTOGROUP_SWITCH.exists() and AUTOGROUP_SWITCH.read_text().strip() == "1"


def test_a_lowered_service_in_its_own_session_yields_the_cpu() -> None:
    cpu = sorted(os.sched_getaffinity(0))[-1]
    start_at = time.time() + 1.5  # both are spinning before the measured 2 s begin
    low = spin(10, cpu, start_at, new_session=True)
    normal = spin(0, cpu, start_at, new_session=True)
    low_r, normal_r = result(low), result(normal)
    assert low_r["proc_nice"] == 10 and normal_r["proc_nice"] == 0
    share = low_r["turns"] / (low_r["turns"] + normal_r["turns"])  # type: ignore[operator]
    # nice 10 against 0 is a weight of 110 against 1024: about 10 %. Without the session's
    # autogroup lowered too, two sessions split one CPU about evenly (50 %).
    assert share < 0.3, (share, low_r, normal_r)
    if autogroups_on():
        assert low_r["applied"][1] == 10 and str(low_r["autogroup"]).endswith("nice 10")


def test_a_process_that_does_not_lead_its_session_leaves_the_session_alone() -> None:
    """Started from a shell (same session as the shell): only its own threads are lowered."""
    before = Path("/proc/self/autogroup").read_text() if Path("/proc/self/autogroup").exists() else ""
    r = result(spin(7, sorted(os.sched_getaffinity(0))[0], 0.0, new_session=False))
    assert r["proc_nice"] == 7
    assert r["applied"] == [7, None]
    if before:
        assert r["autogroup"] == before.strip()  # our session's group, untouched
        assert Path("/proc/self/autogroup").read_text() == before


@pytest.mark.parametrize("nice", [-1, 20])
def test_out_of_range_is_refused(nice: int) -> None:
    with pytest.raises(ValueError, match=r"0\.\.19"):
        lower_cpu_priority(nice)
