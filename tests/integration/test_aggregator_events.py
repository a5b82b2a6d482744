"""The aggregator consumer on a real RabbitMQ node: out-of-order, duplicated and superseded events
end in the right single current flag, with an audit trail and triage.updated events."""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import func, select

from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.aggregator.models import JudgmentRow, PredictionRow, Study, TriageHistory
from services.aggregator.service import Aggregator
from services.core.broker import Broker
from services.core.contracts import Flag
from tests.support.aggregator_service import (  # noqa: F401
    TriageTap,
    aggregator_fixture,
    judgment,
    prediction,
    publish,
    received,
    rejected,
    triage_tap_fixture,
)


async def study_row(agg: Aggregator, uid: str) -> Study | None:
    async with agg.sessions() as s:
        return await s.get(Study, uid)


async def count(agg: Aggregator, model: type, **where: str) -> int:
    async with agg.sessions() as s:
        stmt = select(func.count()).select_from(model)
        for k, v in where.items():
            stmt = stmt.where(getattr(model, k) == v)
        return int(await s.scalar(stmt) or 0)


async def drained(agg: Aggregator, broker: Broker) -> None:
    """Wait until the aggregator queue holds nothing (ready or unacked) and the outbox is published."""
    assert broker.connection is not None
    rabbit = RABBIT[0]

    async def check() -> bool:
        depths = await asyncio.to_thread(rabbit.queue_depths)
        return depths.get("aggregator.events", 0) == 0 and await agg.relay.backlog() == 0

    await eventually_async(check, what="queue drained and outbox published")


RABBIT: list[RabbitNode] = []


@pytest.fixture(autouse=True)
def _remember_rabbit(rabbit: RabbitNode) -> None:
    RABBIT[:] = [rabbit]


async def test_judgments_before_prediction_and_duplicates(
    aggregator: Aggregator, broker: Broker, triage_tap: TriageTap
) -> None:
    study, sop = "1.2.826.0.1.99.10", "1.2.826.0.1.99.10.1"
    # The crowd answers before the model (and before ingest's own event arrives).
    await publish(broker, judgment(sop, "j1", True, study=study))
    await publish(broker, judgment(sop, "j2", True, study=study))
    await publish(broker, judgment(sop, "j1", True, study=study))  # redelivered duplicate
    await publish(broker, prediction(sop, 0.97, "1", study=study))
    await publish(broker, prediction(sop, 0.97, "1", study=study))  # the same prediction twice
    await publish(broker, received(sop, study))

    async def urgent() -> bool:
        row = await study_row(aggregator, study)
        return row is not None and row.flag == "URGENT"

    await eventually_async(urgent, what="URGENT")
    await drained(aggregator, broker)
    row = await study_row(aggregator, study)
    assert row is not None and row.human_judgments == 2 and row.model_version == "1"
    assert await count(aggregator, JudgmentRow, sop_uid=sop) == 2
    assert await count(aggregator, PredictionRow, sop_uid=sop) == 1
    assert await count(aggregator, Study, study_uid=study) == 1
    # Every visible change is in the audit trail, and each was published once as triage.updated.
    assert await count(aggregator, TriageHistory, study_uid=study) == row.revision
    await eventually_async(lambda: _has(triage_tap, study, row.revision), what="triage.updated events")
    events = triage_tap.for_study(study)
    assert sorted(e.revision for e in events) == list(range(1, row.revision + 1))
    assert max(events, key=lambda e: e.revision).flag == Flag.FLAG_URGENT


async def _has(tap: TriageTap, study: str, revisions: int) -> bool:
    return len({e.revision for e in tap.for_study(study)}) >= revisions


async def test_newer_model_version_supersedes_older_in_any_order(aggregator: Aggregator, broker: Broker) -> None:
    study, sop = "1.2.826.0.1.99.20", "1.2.826.0.1.99.20.1"
    await publish(broker, received(sop, study))
    await publish(broker, prediction(sop, 0.96, "1", study=study))

    async def flag_is(flag: str) -> bool:
        row = await study_row(aggregator, study)
        return row is not None and row.flag == flag

    await eventually_async(lambda: flag_is("URGENT"), what="URGENT from v1")
    await publish(broker, prediction(sop, 0.03, "10", study=study))
    await eventually_async(lambda: flag_is("LIKELY_HEALTHY"), what="LIKELY_HEALTHY from v10")
    # An older version arriving late (e.g. a redelivery) does not take over: "10" > "9" > "1".
    await publish(broker, prediction(sop, 0.99, "9", study=study))
    await drained(aggregator, broker)
    row = await study_row(aggregator, study)
    assert row is not None and row.flag == "LIKELY_HEALTHY" and row.model_version == "10"
    assert await count(aggregator, PredictionRow, sop_uid=sop) == 3


async def test_rejected_and_ineligible_images_are_not_triaged(aggregator: Aggregator, broker: Broker) -> None:
    s1, s2 = "1.2.826.0.1.99.30", "1.2.826.0.1.99.31"
    await publish(broker, rejected(s1 + ".1", s1))
    await publish(broker, received(s2 + ".1", s2, eligible=False))
    await drained(aggregator, broker)

    async def both() -> bool:
        a, b = await study_row(aggregator, s1), await study_row(aggregator, s2)
        return a is not None and b is not None and a.flag == b.flag == "NOT_TRIAGED"

    await eventually_async(both, what="NOT_TRIAGED")
    a, b = await study_row(aggregator, s1), await study_row(aggregator, s2)
    assert a is not None and "modality CT" in a.reason
    assert b is not None and "view position LL" in b.reason


async def test_study_takes_its_most_urgent_image_and_crowd_disagreement_is_uncertain(
    aggregator: Aggregator, broker: Broker
) -> None:
    study = "1.2.826.0.1.99.40"
    a, b = study + ".1", study + ".2"
    for sop in (a, b):
        await publish(broker, received(sop, study))
    await publish(broker, prediction(a, 0.02, study=study))
    await publish(broker, prediction(b, 0.02, study=study))

    async def flag_is(flag: str) -> bool:
        row = await study_row(aggregator, study)
        return row is not None and row.flag == flag

    await eventually_async(lambda: flag_is("LIKELY_HEALTHY"), what="both images healthy")
    # An annotator calls image b pneumonia: the fused P stays low, but the model and the crowd
    # disagree, so the study is no longer cleared.
    await publish(broker, judgment(b, "jb1", True, trust=0.8, study=study))
    await drained(aggregator, broker)
    await eventually_async(lambda: flag_is("UNCERTAIN"), what="UNCERTAIN after disagreement")
    async with aggregator.sessions() as s:
        history = (
            await s.scalars(
                select(TriageHistory).where(TriageHistory.study_uid == study).order_by(TriageHistory.revision)
            )
        ).all()
    assert "LIKELY_HEALTHY" in [h.flag for h in history]
    assert history[-1].flag == "UNCERTAIN" and history[-1].previous_flag == "LIKELY_HEALTHY"
    assert history[-1].evidence[b]["votes"], "the audit trail keeps the evidence behind the change"
    assert "crowd leans pneumonia" in history[-1].reason
