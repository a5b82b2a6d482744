"""Broker down during ingest: C-STORE still succeeds, events go out once it is back — none lost, none twice."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import httpx
import pydicom

from harness.dicom_peers import STORESCU
from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.ingest.app import IngestService
from services.ingest.tools.make_dicom import make_dicom_file
from tests.support.ingest_service import AE_TITLE, call, drain, ingest_service_fixture, run  # noqa: F401


async def test_broker_outage_delays_but_never_drops_events(
    ingest_service: IngestService, rabbit: RabbitNode, shared_data: Path, tmp_path: Path
) -> None:
    images = sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[:20]
    files = [make_dicom_file(p, tmp_path, transfer_syntax="explicit", bits=12) for p in images]
    expected = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    health_url = f"http://127.0.0.1:{ingest_service.settings.http_port}/healthz"

    await call(rabbit.stop_app)
    try:
        res = await run(
            [STORESCU, "-aet", "OUTAGE", "-aec", AE_TITLE, "127.0.0.1", str(ingest_service.dicom_port)]
            + [str(f) for f in files]
        )
        assert res.returncode == 0, res.stderr  # every C-STORE acknowledged while the broker is down
        async with httpx.AsyncClient() as client:
            health = (await client.get(health_url, timeout=10)).json()
        assert health["status"] == "ok"
        assert health["checks"]["broker"]["outbox_backlog"] == len(files)
    finally:
        await call(rabbit.start_app)

    events = await drain(rabbit.url, "inference.images", expected=len(files), timeout=120, settle=3.0)
    counts = Counter(p.image.sop_instance_uid for _, p in events)
    assert set(counts) == expected  # none lost
    assert max(counts.values()) == 1  # none duplicated

    # the outbox is empty again
    async def outbox_empty() -> bool:
        return await ingest_service.relay.backlog() == 0

    await eventually_async(outbox_empty, 10, 0.2, what="an empty outbox")
