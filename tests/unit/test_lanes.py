"""Lanes without a broker: the routing keys, the gate's order (fresh first, backfill never starved),
the backlog gauges' arithmetic and ingest's lane rules."""

from __future__ import annotations

import asyncio
from datetime import datetime

from services.core.broker import CONSUMERS
from services.core.contracts import ImageReceived, ImageRef, Prediction, TriageUpdated
from services.core.lanes import BACKFILL, FRESH, LaneGate, LaneMonitor, lane_of, routing_key_for, split_routing_key
from services.ingest.config import IngestSettings
from services.ingest.lane_rules import acquired_at, classify, parse_dicom_datetime


def test_routing_keys_and_queues_per_lane() -> None:
    assert routing_key_for("image.received", BACKFILL) == "image.received.backfill"
    assert routing_key_for("image.received", FRESH) == "image.received"
    assert split_routing_key("prediction.made.backfill") == ("prediction.made", BACKFILL)
    assert split_routing_key("prediction.made") == ("prediction.made", FRESH)
    spec = CONSUMERS["aggregator"].lane(BACKFILL)
    assert spec.queue == "aggregator.events.backfill" and spec.dlq == "aggregator.events.backfill.dlq"
    assert "image.received.backfill" in spec.bindings and "image.received" not in spec.bindings
    assert CONSUMERS["inference"].lane(FRESH) is CONSUMERS["inference"]
    # the lane travels in ImageRef, which every later event copies
    assert lane_of(ImageReceived(image=ImageRef(lane="backfill"))) == BACKFILL
    assert lane_of(Prediction(image=ImageRef(lane="backfill"))) == BACKFILL
    assert lane_of(Prediction(image=ImageRef())) == FRESH
    assert lane_of(TriageUpdated()) in (FRESH, BACKFILL)


async def test_gate_serves_fresh_first_and_never_starves_backfill() -> None:
    gate = LaneGate(1, burst=3)
    order: list[str] = []
    await gate.acquire(BACKFILL)  # the one slot is busy

    async def one(lane: str, tag: str) -> None:
        async with gate.slot(lane):
            order.append(tag)

    tasks = [asyncio.create_task(one(BACKFILL, f"b{i}")) for i in range(3)]
    await asyncio.sleep(0)  # let them queue (not synchronisation: the gate holds them all)
    tasks += [asyncio.create_task(one(FRESH, f"f{i}")) for i in range(5)]
    await asyncio.sleep(0)
    assert gate.waiting(FRESH) == 5 and gate.waiting(BACKFILL) == 3
    gate.release()
    await asyncio.gather(*tasks)
    # fresh first, one backfill after every 3 fresh while backfill waits, then the rest
    assert order == ["f0", "f1", "f2", "b0", "f3", "f4", "b1", "b2"]


async def test_gate_gives_backfill_every_slot_when_fresh_is_idle() -> None:
    gate = LaneGate(4)
    for _ in range(4):
        await asyncio.wait_for(gate.acquire(BACKFILL), 1)
    assert gate.busy == 4


def test_monitor_depth_age_rate_eta() -> None:
    m = LaneMonitor("inference", {FRESH: "q", BACKFILL: "q.backfill"})
    m.update({FRESH: 0, BACKFILL: 100})
    for i in range(10):
        m.taken(BACKFILL, i, 1.0)
        m.done(BACKFILL, i)
    m._last -= 1.0  # one second since the last poll
    m.update({FRESH: 0, BACKFILL: 90})
    snap = m.snapshot(BACKFILL)
    assert snap["depth"] == 90 and snap["rate"] > 5 and 0 < snap["eta_s"] < 20
    assert snap["oldest_age_s"] > 1000  # published at epoch 1 s
    assert m.snapshot(FRESH) == {"depth": 0.0, "oldest_age_s": 0.0, "rate": 0.0, "eta_s": 0.0}


def test_lane_rules_in_order() -> None:
    s = IngestSettings(backfill_aes="MIGRATE, ARCHIVE", backfill_age_h=24)
    now = datetime(2026, 12, 7, 12, 0)
    old, recent = datetime(2026, 11, 1, 9, 0), datetime(2026, 12, 7, 8, 0)
    assert classify(s, "MIGRATE", 1, recent, now=now)[0] == BACKFILL  # the AE rule wins over HIGH
    assert classify(s, "PACS", 1, old, now=now) == (FRESH, "priority HIGH")
    lane, reason = classify(s, "PACS", 0, old, "study", now=now)
    assert lane == BACKFILL and reason.startswith("study date 2026-11-01 09:00 older than 24 h")
    assert classify(s, "PACS", 2, recent, now=now)[0] == FRESH
    assert classify(s, "PACS", 0, None, now=now) == (FRESH, "no acquisition date")
    assert classify(IngestSettings(lanes=False, backfill_aes="MIGRATE"), "MIGRATE", 0, old, now=now)[0] == FRESH


def test_acquisition_moment_from_the_header() -> None:
    assert parse_dicom_datetime("20260103", "142530.123") == datetime(2026, 1, 3, 14, 25, 30)
    assert parse_dicom_datetime("2026", "") is None and parse_dicom_datetime("20261399", "") is None
    assert acquired_at({"StudyDate": "20250101", "AcquisitionDate": "20260102", "AcquisitionTime": "0930"}) == (
        datetime(2026, 1, 2, 9, 30),
        "acquisition",
    )
    assert acquired_at({"AcquisitionDateTime": "20260105101112+0100"}) == (
        datetime(2026, 1, 5, 10, 11, 12),
        "acquisition",
    )
    assert acquired_at({"StudyDate": "20250101"}) == (datetime(2025, 1, 1), "study")
    assert acquired_at({}) == (None, "")
