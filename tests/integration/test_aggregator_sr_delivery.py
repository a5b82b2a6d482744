"""SR delivery as its own supervised queue (issue 23, item 2), against real peers: a PACS that
accepts TCP and never answers (a real socket), a real Orthanc behind it once it is "back", and a
real Orthanc that rejects our association (DicomCheckCalledAet with a wrong called AE title).

Before: each pending SR waited out a 30 s ACSE timeout in turn (8 pending = 4 minutes per round,
new results behind them), one association per SR, no back-off, no metrics, /healthz ok, and the
rejection reason only in pynetdicom's own per-attempt log lines."""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from harness.dicom_peers import Orthanc, orthanc_fixture  # noqa: F401
from harness.silent_pacs import SwitchablePeer
from harness.wait import eventually_async
from services.aggregator.config import AggregatorSettings
from services.aggregator.models import SrDelivery
from services.aggregator.service import Aggregator
from services.core.telemetry import ops_app
from tests.support.aggregator_service import apply_events, prediction, received, write_test_policy


def gauge(name: str, label: str) -> float | None:
    return REGISTRY.get_sample_value(name, {"destination": label})


def failures(label: str, reason: str) -> float:
    return REGISTRY.get_sample_value("pt_aggregator_sr_failures_total", {"destination": label, "reason": reason}) or 0.0


async def healthz(agg: Aggregator) -> tuple[int, dict[str, Any]]:
    """/healthz with the aggregator's checks (no broker runs in these tests: that check is left out)."""

    async def checks() -> dict[str, Any]:
        return {k: v for k, v in (await agg.health()).items() if k != "broker"}

    app = ops_app("aggregator", checks)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://a") as c:
        resp = await c.get("/healthz")
    return resp.status_code, resp.json()


async def make_aggregator(tmp_path: Path, port: int, aet: str, **kw: Any) -> Aggregator:
    settings = AggregatorSettings(
        data_dir=tmp_path,
        policy_file=write_test_policy(tmp_path / "policy.yaml"),
        sr_destination=f"127.0.0.1:{port}:{aet}",
        sr_settle_s=0,
        secret_key="x",
        **kw,
    )
    agg = Aggregator(settings)
    await agg.migrate()
    return agg


def sr_count(orthanc: Orthanc) -> int:
    return sum(1 for i in orthanc.instances() if orthanc.instance_tags(i).get("Modality") == "SR")


async def count_is(orthanc: Orthanc, n: int) -> bool:
    return await asyncio.to_thread(sr_count, orthanc) == n


async def test_silent_pacs_costs_one_timeout_per_attempt_and_drains_when_back(orthanc: Orthanc, tmp_path: Path) -> None:
    peer = SwitchablePeer()
    agg = await make_aggregator(
        tmp_path, peer.port, orthanc.aet,
        sr_acse_timeout_s=1.0, sr_retry_seconds=0.5, sr_backoff_max_s=1.0, sr_health_max_age_s=0.5,
    )  # fmt: skip
    label = f"{orthanc.aet}@127.0.0.1:{peer.port}"
    stop = asyncio.Event()
    loop_task: asyncio.Task[None] | None = None
    try:
        for i in range(8):  # 8 studies, one SR each, all pending
            study, sop = f"1.2.826.0.1.99.80.{i}", f"1.2.826.0.1.99.80.{i}.1"
            await apply_events(agg, received(sop, study), prediction(sop, 0.03, study=study))
        started = time.monotonic()
        # Before: 8 x 30 s in turn. Now: one association (one ACSE timeout) for all of them.
        assert await asyncio.wait_for(agg.send_pending_srs(), 20) == 0
        assert time.monotonic() - started < 10
        assert peer.accepted == 1, "one association carries the pending SRs, not one each"
        assert failures(label, "timeout") == 1
        # The breaker is open: another round at once makes no attempt.
        assert await agg.send_pending_srs() == 0 and peer.accepted == 1
        assert gauge("pt_aggregator_sr_pending", label) == 8
        assert gauge("pt_aggregator_sr_breaker_open", label) == 1
        await asyncio.sleep(0.6)  # the pause is the point: the oldest pending SR passes the threshold
        await agg.refresh_sr_gauges()
        assert (gauge("pt_aggregator_sr_oldest_pending_seconds", label) or 0) > 0.5
        code, body = await healthz(agg)
        assert code == 200 and body["status"] == "degraded"  # degraded, the worklist still served
        check = body["checks"]["sr_delivery"]
        assert check["ok"] is False and check["pending"] == 8 and check["reason"] == "timeout"
        async with agg.sessions() as s:
            rows = (await s.scalars(select(SrDelivery))).all()
        assert all(r.status == "pending" and r.last_error.startswith("timeout") for r in rows)

        # The PACS comes back; a new URGENT result arrives behind the backlog.
        peer.target = orthanc.dicom_port
        urgent_study, urgent_sop = "1.2.826.0.1.99.81", "1.2.826.0.1.99.81.1"
        await apply_events(agg, received(urgent_sop, urgent_study), prediction(urgent_sop, 0.97, study=urgent_study))
        loop_task = asyncio.create_task(agg.sr_loop(stop))
        back = time.monotonic()
        await eventually_async(lambda: count_is(orthanc, 9), 30, 0.2, what="all 9 SRs in the PACS")
        assert time.monotonic() - back < 15

        async def all_sent() -> list[SrDelivery] | None:
            async with agg.sessions() as s:
                rows = (await s.scalars(select(SrDelivery))).all()
            return list(rows) if all(r.status == "sent" for r in rows) else None

        rows = await eventually_async(all_sent, 10, 0.05, what="every delivery recorded as sent")
        urgent = next(r for r in rows if r.study_uid == urgent_study)
        assert all(urgent.sent_at <= r.sent_at for r in rows), "URGENT goes first"
        await agg.refresh_sr_gauges()
        assert gauge("pt_aggregator_sr_pending", label) == 0
        assert gauge("pt_aggregator_sr_breaker_open", label) == 0
        assert REGISTRY.get_sample_value("pt_aggregator_sr_sent_total", {"destination": label}) == 9
        code, body = await healthz(agg)
        assert code == 200 and body["status"] == "ok" and body["checks"]["sr_delivery"]["state"] == "closed"
    finally:
        stop.set()
        if loop_task is not None:
            await asyncio.wait_for(loop_task, 30)
        peer.close()
        await agg.engine.dispose()


async def test_rejecting_pacs_reason_decoded_logged_once_then_delivered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pacs = Orthanc(aet="HOSPITALPACS", config_overrides={"DicomCheckCalledAet": True}).start()
    agg = await make_aggregator(tmp_path, pacs.dicom_port, "WRONGAE", sr_retry_seconds=0.05, sr_backoff_max_s=0.1)
    label = f"WRONGAE@127.0.0.1:{pacs.dicom_port}"
    caplog.set_level(logging.INFO)
    try:
        study, sop = "1.2.826.0.1.99.82", "1.2.826.0.1.99.82.1"
        await apply_events(agg, received(sop, study), prediction(sop, 0.97, study=study))
        for _ in range(3):  # three attempts, each after the back-off
            await eventually_async(lambda: agg.sr_breaker.may_attempt(), 5, 0.02)  # type: ignore[union-attr]
            assert await agg.send_pending_srs() == 0
        assert failures(label, "rejected") == 3
        lines = [r for r in caplog.records if r.getMessage() == "SR destination not accepting SRs"]
        assert len(lines) == 1, "one line per state change, not per attempt"
        detail = lines[0].__dict__["detail"]
        assert "Rejected" in detail and "Called AE" in detail, detail
        assert lines[0].__dict__["permanent"] is True
        assert not [r for r in caplog.records if r.name.startswith("pynetdicom") and r.levelno >= logging.ERROR]
        _, body = await healthz(agg)
        assert body["checks"]["sr_delivery"]["reason"] == "rejected"
        assert "Called AE" in body["checks"]["sr_delivery"]["detail"]

        # The PACS admin fixes it (here: the PACS stops checking the called AE title).
        pacs.stop()
        pacs.config_overrides["DicomCheckCalledAet"] = False
        pacs.start()
        await eventually_async(lambda: agg.sr_breaker.may_attempt(), 5, 0.02)  # type: ignore[union-attr]
        assert await agg.send_pending_srs() == 1
        assert await asyncio.to_thread(sr_count, pacs) == 1
        back = [r for r in caplog.records if r.getMessage() == "SR destination accepting SRs again"]
        assert len(back) == 1
    finally:
        pacs.stop()
        await agg.engine.dispose()


async def test_a_large_backlog_is_frozen_one_association_at_a_time_urgent_first(
    orthanc: Orthanc, tmp_path: Path
) -> None:
    """Before: every due SR of a backlog was built in one round (one long transaction) before the
    first was sent: 1,000 pending took ~2 minutes under load before the PACS saw any (bench/sr_delivery.py)."""
    agg = await make_aggregator(tmp_path, orthanc.dicom_port, orthanc.aet, sr_batch_size=3)
    try:
        for i in range(7):
            study, sop = f"1.2.826.0.1.99.82.{i}", f"1.2.826.0.1.99.82.{i}.1"
            await apply_events(agg, received(sop, study), prediction(sop, 0.03, study=study))
        urgent_study, urgent_sop = "1.2.826.0.1.99.83", "1.2.826.0.1.99.83.1"
        await apply_events(agg, received(urgent_sop, urgent_study), prediction(urgent_sop, 0.97, study=urgent_study))
        assert await agg.send_pending_srs() == 3
        async with agg.sessions() as s:
            rows = (await s.scalars(select(SrDelivery))).all()
        assert sum(r.dataset is not None for r in rows) == 3, "one association's worth frozen per round"
        assert next(r for r in rows if r.study_uid == urgent_study).status == "sent", "URGENT frozen and sent first"
        assert agg._sr_next_due is not None, "the sender comes back at once for the rest"
        assert await agg.send_pending_srs() == 3 and await agg.send_pending_srs() == 2
        assert await agg.send_pending_srs() == 0
        assert await asyncio.to_thread(sr_count, orthanc) >= 8
    finally:
        await agg.engine.dispose()
