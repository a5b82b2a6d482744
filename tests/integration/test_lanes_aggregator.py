"""The aggregator's lanes (issue 24, item 2) on a real RabbitMQ node: backfill events come through the
`.backfill` queue and flag their study like fresh ones, and the worklist keeps backfill studies out of
today's list, behind a filter (web and JSON API)."""

from __future__ import annotations

import httpx

from harness.wait import eventually_async
from services.aggregator.models import Study
from services.aggregator.service import Aggregator
from services.aggregator.users import upsert_user
from services.aggregator.web.app import create_app
from services.core.broker import Broker
from services.core.lanes import BACKFILL
from tests.support.aggregator_service import aggregator_fixture, prediction, publish, received  # noqa: F401

FRESH_STUDY, OLD_STUDY = "1.2.826.0.1.24.1", "1.2.826.0.1.24.2"


async def signed_in_client(agg: Aggregator) -> httpx.AsyncClient:
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(agg)), base_url="http://aggregator")
    await upsert_user("lanes-clinician", "clinician", "pw-123456", agg.settings)
    page = await client.get("/login")
    token = page.text.split('name="csrf_token" value="')[1].split('"')[0]
    res = await client.post(
        "/login",
        data={"username": "lanes-clinician", "password": "pw-123456", "csrf_token": token, "next": "/worklist"},
    )
    assert res.status_code == 303
    return client


async def test_backfill_studies_are_flagged_and_listed_behind_a_filter(aggregator: Aggregator, broker: Broker) -> None:
    old_image, old_pred = received("1.2.24.2.1", OLD_STUDY), prediction("1.2.24.2.1", 0.97, study=OLD_STUDY)
    old_image.image.lane = old_pred.image.lane = BACKFILL
    for msg in (
        old_image,
        old_pred,
        received("1.2.24.1.1", FRESH_STUDY),
        prediction("1.2.24.1.1", 0.02, study=FRESH_STUDY),
    ):
        await publish(broker, msg)

    async def flagged() -> bool:
        async with aggregator.sessions() as s:
            rows = [await s.get(Study, uid) for uid in (FRESH_STUDY, OLD_STUDY)]
        return all(r is not None and r.flag != "PENDING" for r in rows)

    await eventually_async(flagged, 30, what="both studies flagged")
    async with aggregator.sessions() as s:
        assert (await s.get(Study, OLD_STUDY)).lane == BACKFILL  # type: ignore[union-attr]
        assert (await s.get(Study, FRESH_STUDY)).lane == "fresh"  # type: ignore[union-attr]
    client = await signed_in_client(aggregator)
    try:

        async def listed(**params: str) -> list[str]:
            res = await client.get("/api/v1/studies", params=params)
            assert res.status_code == 200, res.text
            return sorted(item["study_uid"] for item in res.json()["items"])

        assert await listed() == [FRESH_STUDY]  # today's list: the urgent backfill study is not mixed in
        assert await listed(lane="backfill") == [OLD_STUDY]
        assert await listed(lane="all") == [FRESH_STUDY, OLD_STUDY]
        page = await client.get("/worklist")
        assert FRESH_STUDY in page.text and OLD_STUDY not in page.text and 'name="lane"' in page.text
        page = await client.get("/worklist", params={"lane": "backfill"})
        assert OLD_STUDY in page.text and FRESH_STUDY not in page.text
    finally:
        await client.aclose()
