"""Refused images are an expected outcome, not errors: files other toolkits wrote (pydicom's CT and
SR test files) sent with dcmtk's storescu to the real ingest are refused there, reach the running
aggregator as image.rejected without a study, and are counted (metric, /api/v1/refusals), acked,
and kept out of the dead-letter queue, which stays for real failures."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import httpx
import pydicom
from prometheus_client import REGISTRY
from pydicom.data import get_testdata_file
from sqlalchemy import func, select

from harness.dicom_peers import STORESCU
from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.aggregator.models import Refusal, Study
from services.aggregator.service import Aggregator
from services.aggregator.users import upsert_user
from services.aggregator.web.app import create_app
from services.core.broker import Broker
from services.core.contracts import ImageRef, Prediction
from services.ingest.app import IngestService
from tests.support.aggregator_service import aggregator_fixture, publish, rejected  # noqa: F401
from tests.support.ingest_service import AE_TITLE, ingest_service_fixture, run  # noqa: F401

REASON = "unsupported_sop_class"


def refusals_metric(reason: str) -> float:
    return REGISTRY.get_sample_value("pt_aggregator_refusals_total", {"reason": reason}) or 0.0


async def refusal_count(agg: Aggregator) -> int:
    async with agg.sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(Refusal)) or 0)


async def settled(rabbit: RabbitNode) -> dict[str, int]:
    """Queue depths once aggregator.events is empty (ready and unacked)."""
    depths: dict[str, int] = {}

    async def empty() -> bool:
        depths.update(await asyncio.to_thread(rabbit.queue_depths))
        return depths.get("aggregator.events", 1) == 0

    await eventually_async(empty, what="aggregator.events drained")
    return depths


async def clinician_client(agg: Aggregator) -> httpx.AsyncClient:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(agg)), base_url="http://aggregator")
    await upsert_user("ops-clinician", "clinician", "pw-123456", agg.settings)
    token = (await client.get("/login")).text.split('name="csrf_token" value="')[1].split('"')[0]
    res = await client.post(
        "/login", data={"username": "ops-clinician", "password": "pw-123456", "csrf_token": token, "next": "/worklist"}
    )
    assert res.status_code == 303
    return client


async def test_storescu_refusals_are_counted_not_dead_lettered(
    ingest_service: IngestService, aggregator: Aggregator, rabbit: RabbitNode, shared_data: Path
) -> None:
    ct, sr = get_testdata_file("CT_small.dcm"), get_testdata_file("test-SR.dcm")
    assert ct is not None and sr is not None
    xray = sorted((shared_data / "dicom").glob("*.dcm"))[0]
    before = refusals_metric(REASON)
    port = str(ingest_service.dicom_port)
    # storescu proposes the files' own SOP classes; ingest negotiates them and refuses each C-STORE
    # with 0x0122 and a reason (the X-ray in the same association is stored).
    send = [STORESCU, "-v", "-nh", "-xy", "-aet", "MODALITY1", "-aec", AE_TITLE, "127.0.0.1", port]
    res = await run([*send, str(ct), str(sr), str(xray)])
    assert res.stderr.count("Refused: SOPClassNotSupported") == 2, res.stderr

    async def recorded() -> bool:
        async with aggregator.sessions() as s:
            study = await s.get(Study, str(pydicom.dcmread(xray, stop_before_pixels=True).StudyInstanceUID))
        return await refusal_count(aggregator) == 2 and study is not None

    await eventually_async(recorded, what="two refusals and the X-ray's study in the aggregator")
    depths = await settled(rabbit)
    assert depths.get("aggregator.events.dlq", 0) == 0, "a refusal is not a dead letter"
    assert refusals_metric(REASON) - before == 2

    # The same files again: ingest refuses them again (counted there as attempts), no new refusal here.
    await run([*send, str(ct), str(sr)])
    await settled(rabbit)
    assert await refusal_count(aggregator) == 2

    async with contextlib.aclosing(await clinician_client(aggregator)) as client:
        body = (await client.get("/api/v1/refusals")).json()
    assert body["total"] == 2 and body["by_reason"] == {REASON: 2}
    uids = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in (ct, sr)}
    assert {i["sop_instance_uid"] for i in body["items"]} == set(uids)
    for item in body["items"]:
        assert item["study_instance_uid"] is None  # refused before ingest read the study
        assert item["dicom_status"] == "0x0122" and item["calling_ae_title"] == "MODALITY1"
        assert "not an X-ray image class" in item["reason"]


async def test_redelivered_refusal_and_a_real_failure(
    aggregator: Aggregator, broker: Broker, rabbit: RabbitNode
) -> None:
    """A duplicated refusal changes nothing; an event that can never be applied still dead-letters."""
    no_study = rejected("1.2.826.0.1.99.60.1", study="")
    await publish(broker, no_study)
    await publish(broker, no_study)
    with_study = rejected("1.2.826.0.1.99.61.1", study="1.2.826.0.1.99.61")
    await publish(broker, with_study)
    poison = Prediction(image=ImageRef(sop_instance_uid="1.2.826.0.1.99.63.1"), model_version="1", probability=0.5)
    await broker.publish("prediction.made", poison, message_id="inference:poison:1")

    async def done() -> bool:
        return await refusal_count(aggregator) == 2

    await eventually_async(done, what="two refusals recorded")
    depths = await settled(rabbit)
    assert depths.get("aggregator.events.dlq", 0) == 1, "the prediction without a study is a real failure"
    async with aggregator.sessions() as s:
        study = await s.get(Study, "1.2.826.0.1.99.61")
    assert study is not None and study.flag == "NOT_TRIAGED"  # a refusal that names its study marks it
