"""Bounded soak (slow): 2,000 real X-rays over loopback on 4 concurrent storescu associations
(in 4 waves of 500), each service's resident memory sampled every second. Bound: after the first
wave (warm-up: model loaded, caches and pools filled) no service grows by more than
max(64 MiB, 25 %) over its warm-up peak, and none exceeds 1.5 GiB; every image accounted for."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from harness.rabbitmq import RabbitNode
from harness.system_harness import SendResult, SystemHarness
from harness.system_reconcile import wait_reconciled
from harness.system_scenario import FAST_ENV, make_batch, model_env

N_TOTAL, WAVES, ASSOCIATIONS = 2000, 4, 4
MIB = 2**20
GROWTH_FLOOR, GROWTH_SHARE, ABS_CAP = 64 * MIB, 0.25, 1536 * MIB


class RssSampler(threading.Thread):
    def __init__(self, system: SystemHarness, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.system = system
        self.interval = interval
        self.samples: dict[str, list[tuple[float, int]]] = {s: [] for s in system.children}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            now = time.monotonic()
            for svc, rss in self.system.rss().items():
                if rss:
                    self.samples[svc].append((now, rss))

    def stop(self) -> None:
        self._halt.set()
        self.join(10)

    def peak_between(self, svc: str, t0: float, t1: float) -> int:
        return max((r for t, r in self.samples[svc] if t0 <= t <= t1), default=0)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_soak_memory_bounded(rabbit: RabbitNode, shared_data: Path, tmp_path: Path) -> None:
    per_wave = N_TOTAL // WAVES
    waves = [make_batch(shared_data, tmp_path / f"wave{i}", per_wave, seed=1000 + i) for i in range(WAVES)]
    system = SystemHarness(rabbit, tmp_path / "system", env={**FAST_ENV, **model_env(), "PT_LOG_LEVEL": "WARNING"})
    system.start()
    sampler = RssSampler(system)
    sampler.start()
    acked: set[str] = set()
    marks: list[float] = [time.monotonic()]
    try:
        for batch in waves:
            sent: SendResult = system.send(batch.paths, associations=ASSOCIATIONS)
            acked |= batch.acked_uids(sent)
            rec = wait_reconciled(system, acked, timeout=900, check_labeling=True)
            assert rec.problems() == [], rec.table()
            marks.append(time.monotonic())
        assert len(acked) == N_TOTAL
        assert all(c.starts == 1 for c in system.children.values()), "no service restarted during the soak"
    finally:
        sampler.stop()
        system.stop()
    report = []
    for svc in system.children:
        warm = sampler.peak_between(svc, marks[0], marks[1])
        later = sampler.peak_between(svc, marks[1], marks[-1])
        bound = warm + max(GROWTH_FLOOR, int(warm * GROWTH_SHARE))
        report.append(
            f"{svc:<11} warm-up peak {warm / MIB:7.1f} MiB, later peak {later / MIB:7.1f} MiB, bound {bound / MIB:7.1f}"
        )
        assert warm > 0 and later > 0
        assert later <= bound, "\n".join(report)
        assert later <= ABS_CAP, "\n".join(report)
    print("\n".join(report))
