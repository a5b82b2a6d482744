"""The drift monitor on the aggregator's own database: a stream like the validation reference does
not fire it; a shifted stream (healthy images scoring higher, as at a site with another detector)
does, and the figures reach Prometheus and the API's status; gate-refused images are left out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from services.aggregator.drift import DriftConfig, evaluate_window
from services.aggregator.service import Aggregator
from services.core.calibration import sigmoid
from services.core.drift import REFERENCE_FILE, build_reference, ks, psi
from tests.support.aggregator_service import (  # noqa: F401
    apply_events,
    offline_aggregator_fixture,
    prediction,
)

V1 = {"model_version": "1"}


def stream(rng: np.random.Generator, n: int, shift: float = 0.0, prevalence: float = 0.75) -> np.ndarray:
    """Logits of a mixed stream: pneumonia ~ N(3, 1.5), healthy ~ N(-3 + shift, 1.5)."""
    y = rng.random(n) < prevalence
    return np.where(y, rng.normal(3, 1.5, n), rng.normal(-3 + shift, 1.5, n))


@pytest.fixture
def reference_dir(tmp_path: Path) -> Path:
    logits = stream(np.random.default_rng(0), 800)
    ref = build_reference(logits, sigmoid(logits), "pneumonia", "1", "test reference")
    (tmp_path / "refs" / "pneumonia" / "1").mkdir(parents=True)
    ref.save(tmp_path / "refs" / "pneumonia" / "1" / REFERENCE_FILE)
    return tmp_path / "refs"


def test_statistics_separate_shifted_from_unshifted(reference_dir: Path) -> None:
    from services.core.drift import DriftReference

    ref = DriftReference.load(reference_dir / "pneumonia" / "1" / REFERENCE_FILE)
    config = DriftConfig(reference_dir, window=300, min_n=100)
    same_stats, shifted_stats = [], []
    for seed in range(1, 21):
        rng = np.random.default_rng(seed)
        same = stream(rng, 300)
        shifted = stream(rng, 300, shift=3.0)
        same_stats.append(evaluate_window(ref, same, sigmoid(same), config))
        shifted_stats.append(evaluate_window(ref, shifted, sigmoid(shifted), config))
    assert sum(s.alarm for s in same_stats) == 0, [s.message for s in same_stats if s.alarm]
    assert all(s.alarm for s in shifted_stats), [s.message for s in shifted_stats if not s.alarm]
    assert max(s.psi or 0 for s in same_stats) < 0.1
    d, p = ks(ref, stream(np.random.default_rng(99), 300, shift=3.0))
    assert d > 0.15 and p < 1e-4
    assert psi(ref, np.array([])) == 0.0


def test_a_prevalence_change_moves_the_positive_rate(reference_dir: Path) -> None:
    from services.core.drift import DriftReference

    ref = DriftReference.load(reference_dir / "pneumonia" / "1" / REFERENCE_FILE)
    logits = stream(np.random.default_rng(5), 300, prevalence=0.2)
    status = evaluate_window(ref, logits, sigmoid(logits), DriftConfig(reference_dir))
    assert status.alarm and "predicted-positive rate" in status.message
    assert status.positive_rate is not None and status.positive_rate < 0.35


@pytest.mark.parametrize("offline_aggregator", [{}], indirect=True)
async def test_monitor_reads_the_database_and_exports_metrics(
    offline_aggregator: Aggregator, reference_dir: Path
) -> None:
    agg = offline_aggregator
    agg.drift.config = DriftConfig(reference_dir, window=200, min_n=60)
    rng = np.random.default_rng(7)

    async def feed(logits: np.ndarray, start: int, **kw: str) -> None:
        for i, z in enumerate(logits):
            msg = prediction(f"1.2.826.0.1.77.{start + i}", float(sigmoid(z)), "1", study=f"1.2.826.0.1.78.{start + i}")
            msg.logit = float(z)
            for k, v in kw.items():
                setattr(msg, k, v)
            await apply_events(agg, msg)

    status = await agg.drift.check()
    assert status.status == "no data" and not status.alarm
    await feed(stream(rng, 100), 0)
    status = await agg.drift.check()
    assert status.status == "ok", status.message
    assert REGISTRY.get_sample_value("pt_aggregator_drift_alarm", V1) == 0
    # gate-refused images do not count as scores (a burst of test patterns is not model drift) ...
    await feed(np.full(70, 6.0), 1000, gate_verdict="refuse", gate_reason="does not look like a chest")
    status = await agg.drift.check()
    assert status.status == "ok" and status.gate_refused_share is not None and status.gate_refused_share > 0.4
    # ... but a shifted stream of accepted images fires the alarm
    await feed(stream(rng, 100, shift=3.0), 2000)
    status = await agg.drift.check()
    assert status.alarm, status.message
    assert REGISTRY.get_sample_value("pt_aggregator_drift_alarm", V1) == 1
    psi_value = REGISTRY.get_sample_value("pt_aggregator_drift_psi", V1)
    assert psi_value is not None and psi_value >= 0.25
    assert status.to_dict()["alarm"] is True


@pytest.mark.parametrize("offline_aggregator", [{}], indirect=True)
async def test_no_reference_never_fires(offline_aggregator: Aggregator, tmp_path: Path) -> None:
    agg = offline_aggregator
    agg.drift.config = DriftConfig(tmp_path / "nothing-here", window=50, min_n=10)
    for i in range(20):
        await apply_events(agg, prediction(f"1.2.826.0.1.79.{i}", 0.99, "1", study=f"1.2.826.0.1.80.{i}"))
    status = await agg.drift.check()
    assert status.status == "no reference" and not status.alarm


@pytest.mark.parametrize("offline_aggregator", [{}], indirect=True)
async def test_worklist_banner_and_api_follow_the_alarm(offline_aggregator: Aggregator, reference_dir: Path) -> None:
    import contextlib

    from tests.integration.test_aggregator_outputs import signed_in_client

    agg = offline_aggregator
    agg.drift.config = DriftConfig(reference_dir, window=80, min_n=60)
    rng = np.random.default_rng(9)
    for i, z in enumerate(stream(rng, 80)):
        await apply_events(
            agg, prediction(f"1.2.826.0.1.81.{i}", float(sigmoid(z)), "1", study=f"1.2.826.0.1.83.{i}", logit=float(z))
        )
    await agg.drift.check()
    async with contextlib.aclosing(await signed_in_client(agg)) as client:
        page = await client.get("/worklist")
        assert page.status_code == 200 and "Model drift" not in page.text
        assert (await client.get("/api/v1/drift")).json()["alarm"] is False
        for i, z in enumerate(stream(rng, 80, shift=3.0)):
            await apply_events(
                agg,
                prediction(f"1.2.826.0.1.82.{i}", float(sigmoid(z)), "1", study=f"1.2.826.0.1.84.{i}", logit=float(z)),
            )
        await agg.drift.check()
        page = await client.get("/worklist")
        assert 'id="drift-banner"' in page.text and "PSI" in page.text
        body = (await client.get("/api/v1/drift")).json()
        assert body["alarm"] is True and body["psi"] >= 0.25 and body["model_version"] == "1"


@pytest.mark.parametrize("offline_aggregator", [{}], indirect=True)
async def test_the_monitor_judges_the_active_version_and_labels_its_gauges(
    offline_aggregator: Aggregator, reference_dir: Path
) -> None:
    """Issue 27: after a deploy (or a roll back) the newest predictions come from the active version;
    the monitor judges it even while most of the window is still the withdrawn version's, and the
    withdrawn version's gauge series go away."""
    agg = offline_aggregator
    agg.drift.config = DriftConfig(reference_dir, window=200, min_n=10)
    rng = np.random.default_rng(11)
    for i, z in enumerate(stream(rng, 150)):  # version 2: a withdrawn version without a reference
        msg = prediction(f"1.2.826.0.1.90.{i}", float(sigmoid(z)), "2", study=f"1.2.826.0.1.91.{i}", logit=float(z))
        await apply_events(agg, msg)
    status = await agg.drift.check()
    assert (status.model_version, status.status) == ("2", "no reference")
    assert REGISTRY.get_sample_value("pt_aggregator_drift_window", {"model_version": "2"}) == 150
    for i, z in enumerate(stream(rng, 30)):  # rolled back to version 1: 30 of the window's 180
        msg = prediction(f"1.2.826.0.1.92.{i}", float(sigmoid(z)), "1", study=f"1.2.826.0.1.93.{i}", logit=float(z))
        await apply_events(agg, msg)
    status = await agg.drift.check()
    assert (status.model_version, status.n, status.status) == ("1", 30, "ok"), status.message
    assert REGISTRY.get_sample_value("pt_aggregator_drift_window", V1) == 30
    assert REGISTRY.get_sample_value("pt_aggregator_drift_window", {"model_version": "2"}) is None


@pytest.mark.parametrize("offline_aggregator", [{}], indirect=True)
async def test_the_drift_alarm_is_logged(
    offline_aggregator: Aggregator, reference_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 23: the alarm line used extra= with a "message" key, which logging refuses (KeyError):
    the alarm was never logged, "drift check failed" was, every interval."""
    import asyncio
    import logging

    from harness.wait import eventually_async

    agg = offline_aggregator
    agg.drift.config = DriftConfig(reference_dir, window=100, min_n=50)
    for i, z in enumerate(stream(np.random.default_rng(12), 100, shift=3.0)):
        msg = prediction(f"1.2.826.0.1.94.{i}", float(sigmoid(z)), "1", study=f"1.2.826.0.1.95.{i}", logit=float(z))
        await apply_events(agg, msg)
    stop = asyncio.Event()
    with caplog.at_level(logging.INFO, logger="services.aggregator.drift"):
        task = asyncio.create_task(agg.drift.run(stop, interval_s=0.05))
        try:
            record = await eventually_async(
                lambda: next((r for r in caplog.records if r.name == "services.aggregator.drift"), None),
                timeout=20,
                what="a log line from the drift monitor",
            )
        finally:
            stop.set()
            await task
    assert record.getMessage() == "drift alarm", record.getMessage()
    assert record.drift["alarm"] is True and record.drift["model_version"] == "1"
