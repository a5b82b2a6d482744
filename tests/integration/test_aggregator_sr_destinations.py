"""Several SR destinations (PT_AGGREGATOR_SR_DESTINATION=NAME=host:port:AE,...), each its own queue,
breaker and sender loop (issue 23): a silent PACS (accepts TCP, never answers) and a rejecting PACS
(a real Orthanc refusing our called AE title) beside a healthy Orthanc. The healthy one gets every
result, an URGENT one included, while the others fail; metrics and /healthz name the failing ones;
the silent one gets everything once it is back, and the rejecting one keeps its own backlog.

Before: one destination only; a second PACS could not be served at all."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from prometheus_client import REGISTRY
from sqlalchemy import select

from harness.dicom_peers import Orthanc, orthanc_fixture  # noqa: F401
from harness.silent_pacs import SwitchablePeer
from harness.wait import eventually_async
from services.aggregator.config import AggregatorSettings
from services.aggregator.models import SrDelivery, SrSend
from services.aggregator.service import Aggregator
from services.aggregator.sr import Destination
from tests.integration.test_aggregator_sr_delivery import healthz
from tests.support.aggregator_service import apply_events, prediction, received, write_test_policy


def sr_uids(pacs: Orthanc) -> set[str]:
    tags = [pacs.instance_tags(i) for i in pacs.instances()]
    return {t["SOPInstanceUID"] for t in tags if t.get("Modality") == "SR"}


def pending(label: str) -> float | None:
    return REGISTRY.get_sample_value("pt_aggregator_sr_pending", {"destination": label})


def test_destinations_parse_with_names_and_must_be_distinct() -> None:
    a, b = Destination.parse_list("PACS=10.0.0.1:104:HOSPITAL, 10.0.0.2:11112:VNA")
    assert (a.key, a.label, b.key, b.label) == ("PACS", "HOSPITAL@10.0.0.1:104", "VNA", "VNA@10.0.0.2:11112")
    assert Destination.parse_list(None) == [] and Destination.parse_list("") == []
    for bad in ("10.0.0.1:104:A,10.0.0.2:104:A", "host:port:AE", "10.0.0.1:104"):
        try:
            Destination.parse_list(bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad!r}")


async def test_a_silent_and_a_rejecting_pacs_never_hold_up_a_healthy_one(orthanc: Orthanc, tmp_path: Path) -> None:
    pacs2 = Orthanc(aet="SECONDPACS", config_overrides={"DicomCheckCalledAet": True}).start()
    silent = SwitchablePeer()
    acse = 3.0
    settings = AggregatorSettings(
        data_dir=tmp_path,
        policy_file=write_test_policy(tmp_path / "policy.yaml"),
        sr_destination=(
            f"SILENT=127.0.0.1:{silent.port}:{pacs2.aet},"
            f"GOOD=127.0.0.1:{orthanc.dicom_port}:{orthanc.aet},"
            f"REJECTING=127.0.0.1:{pacs2.dicom_port}:WRONGAE"
        ),
        sr_settle_s=0,
        sr_acse_timeout_s=acse,
        sr_retry_seconds=0.5,
        sr_backoff_max_s=1.0,
        sr_health_max_age_s=1.0,
        secret_key="x",
    )
    agg = Aggregator(settings)
    await agg.migrate()
    labels = {d.key: d.label for d in agg.destinations}
    stop = asyncio.Event()
    loop_task = asyncio.create_task(agg.sr_loop(stop))
    try:
        before = await asyncio.to_thread(sr_uids, orthanc)
        for i in range(4):
            study, sop = f"1.2.826.0.1.99.90.{i}", f"1.2.826.0.1.99.90.{i}.1"
            await apply_events(agg, received(sop, study), prediction(sop, 0.03, study=study))
        started = time.monotonic()

        async def good_has(n: int) -> bool:
            return len(await asyncio.to_thread(sr_uids, orthanc) - before) == n

        await eventually_async(lambda: good_has(4), 20, 0.1, what="4 SRs in the healthy PACS")
        assert time.monotonic() - started < acse, "the healthy PACS waited for the silent one"

        # A new URGENT result while the silent PACS holds an association open: at once to the healthy one.
        await eventually_async(lambda: silent.accepted >= 1, 10, 0.05)
        urgent_study, urgent_sop = "1.2.826.0.1.99.91", "1.2.826.0.1.99.91.1"
        await apply_events(agg, received(urgent_sop, urgent_study), prediction(urgent_sop, 0.97, study=urgent_study))
        urgent_at = time.monotonic()
        await eventually_async(lambda: good_has(5), 20, 0.05, what="the URGENT SR in the healthy PACS")
        assert time.monotonic() - urgent_at < acse, "an URGENT result waited for the silent PACS"

        # Metrics and /healthz name the failing destinations, not the healthy one.
        silent_breaker = agg.breaker(agg.destinations[0])
        await eventually_async(lambda: silent_breaker.state == "open", 2 * acse, 0.05, what="the ACSE timeout")
        await asyncio.sleep(1.2)  # the oldest SR waiting for the others passes the 1 s health threshold
        await agg.refresh_sr_gauges()
        assert pending(labels["GOOD"]) == 0
        assert pending(labels["SILENT"]) == 5 and pending(labels["REJECTING"]) == 5
        code, body = await healthz(agg)
        check = body["checks"]["sr_delivery"]
        assert code == 200 and body["status"] == "degraded" and check["ok"] is False
        by_name = {d["name"]: d for d in check["destinations"]}
        assert by_name["GOOD"]["ok"] is True and by_name["GOOD"]["pending"] == 0
        assert by_name["GOOD"]["state"] == "closed"
        assert by_name["SILENT"]["ok"] is False and by_name["SILENT"]["reason"] == "timeout"
        assert by_name["REJECTING"]["ok"] is False and by_name["REJECTING"]["reason"] == "rejected"
        async with agg.sessions() as s:
            deliveries = (await s.scalars(select(SrDelivery))).all()
        assert len(deliveries) == 5 and all(d.status == "pending" for d in deliveries), "not every PACS has them"

        # The silent PACS comes back (relaying to the second Orthanc, under the AE title it expects):
        # it gets all five; the rejecting destination still has its five waiting.
        silent.target = pacs2.dicom_port
        await eventually_async(lambda: asyncio.to_thread(lambda: len(sr_uids(pacs2)) == 5), 30, 0.2)
        assert await asyncio.to_thread(sr_uids, pacs2) == await asyncio.to_thread(sr_uids, orthanc) - before

        async def sends_settled() -> list[SrSend] | None:  # the PACS stores before we record it
            async with agg.sessions() as s:
                sends = list((await s.scalars(select(SrSend))).all())
            return sends if all(x.status == "sent" for x in sends if x.destination == "SILENT") else None

        sends = await eventually_async(sends_settled, 10, 0.05, what="the silent PACS's sends recorded")
        assert {(x.destination, x.status) for x in sends} == {
            ("GOOD", "sent"),
            ("SILENT", "sent"),
            ("REJECTING", "pending"),
        }
        assert len(sends) == 15
        await agg.refresh_sr_gauges()
        assert pending(labels["SILENT"]) == 0 and pending(labels["REJECTING"]) == 5
    finally:
        stop.set()
        await asyncio.wait_for(loop_task, 30)
        silent.close()
        pacs2.stop()
        await agg.engine.dispose()
