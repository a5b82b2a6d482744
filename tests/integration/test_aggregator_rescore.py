"""Re-scoring a withdrawn model version's studies in the aggregator (issue 27, item 3): a re-score
prediction from an older version supersedes the withdrawn newer version's prediction (before, the
newest version always won, so a rolled-back version could never replace the withdrawn one), the
audit trail says why, a clinician's flag is kept, and `plan_rescore` finds exactly the images whose
flag rests on the withdrawn version. SQLite, the store without a broker."""

from __future__ import annotations

import uuid

from sqlalchemy import select

from services.aggregator.models import PredictionRow, Study, TriageHistory
from services.aggregator.service import Aggregator
from services.aggregator.tools.rescore import ROUTING_KEY, plan_rescore, requests
from services.core.contracts import RescoreRequested
from tests.support.aggregator_service import (  # noqa: F401
    apply_events,
    offline_aggregator_fixture,
    prediction,
    received,
)


def rescored(sop: str, p: float, study: str, withdrawn: str = "3", version: str = "2") -> object:
    return prediction(
        sop,
        p,
        version=version,
        study=study,
        rescore_of_model_version=withdrawn,
        rescore_reason=f"model version {withdrawn} withdrawn: 1-epoch test",
        rescore_request_id="req1",
    )


async def history(agg: Aggregator, study: str) -> list[TriageHistory]:
    async with agg.sessions() as s:
        rows = await s.scalars(select(TriageHistory).where(TriageHistory.study_uid == study))
        return sorted(rows, key=lambda h: h.revision)


async def test_a_rescore_by_the_older_version_replaces_the_withdrawn_newer_one(offline_aggregator: Aggregator) -> None:
    agg = offline_aggregator
    study = f"2.25.{uuid.uuid4().int}"
    sop = study + ".1"
    await apply_events(agg, received(sop, study, storage_uri="file:///store/a.dcm"), prediction(sop, 0.05, "3", study))
    async with agg.sessions() as s:
        assert (await s.get(Study, study)).flag == "LIKELY_HEALTHY"  # the bad version's verdict

    await apply_events(agg, rescored(sop, 0.97, study))
    async with agg.sessions() as s:
        row = await s.get(Study, study)
        assert row.flag == "URGENT" and row.model_version == "2"
        preds = {p.model_version: p for p in await s.scalars(select(PredictionRow).where(PredictionRow.sop_uid == sop))}
    assert preds["3"].superseded_by == "2" and "1-epoch test" in preds["3"].superseded_reason
    assert preds["2"].superseded_by == ""
    last = (await history(agg, study))[-1]
    assert last.flag == "URGENT" and last.previous_flag == "LIKELY_HEALTHY"
    assert "re-scored by model version 2, replacing version 3" in last.reason and "1-epoch test" in last.reason
    assert "re-scored" in last.evidence["rescore"]

    # the same re-score again (a redelivery) changes nothing
    n = len(await history(agg, study))
    await apply_events(agg, rescored(sop, 0.97, study))
    assert len(await history(agg, study)) == n


async def test_a_clinicians_flag_is_kept_and_the_study_listed_for_review(offline_aggregator: Aggregator) -> None:
    agg = offline_aggregator
    study = f"2.25.{uuid.uuid4().int}"
    sop = study + ".1"
    await apply_events(agg, received(sop, study, storage_uri="file:///store/b.dcm"), prediction(sop, 0.05, "3", study))
    await agg.review(study, "dr-ada", "confirm", None, "looks clear")

    async with agg.sessions() as s:
        plan = await plan_rescore(s, "3")
    assert [t.sop_uid for t in plan.targets] == [sop]
    assert plan.reviewed == [(study, "LIKELY_HEALTHY", "dr-ada")]

    await apply_events(agg, rescored(sop, 0.97, study))
    async with agg.sessions() as s:
        row = await s.get(Study, study)
    assert row.flag == "LIKELY_HEALTHY" and row.overridden_by == "dr-ada"  # never overwritten silently
    last = (await history(agg, study))[-1]
    assert last.flag == "LIKELY_HEALTHY" and "policy says URGENT" in last.reason and "re-scored" in last.reason


async def test_plan_finds_only_images_whose_flag_rests_on_the_withdrawn_version(
    offline_aggregator: Aggregator,
) -> None:
    agg = offline_aggregator
    study = f"2.25.{uuid.uuid4().int}"
    on_v3, on_v2, rescored_sop, refused = (f"{study}.{i}" for i in range(1, 5))
    await apply_events(
        agg,
        received(on_v3, study, storage_uri="file:///store/1.dcm"),
        prediction(on_v3, 0.1, "3", study),
        received(on_v2, study, storage_uri="file:///store/2.dcm"),
        prediction(on_v2, 0.1, "2", study),
        received(rescored_sop, study, storage_uri="file:///store/3.dcm"),
        prediction(rescored_sop, 0.1, "3", study),
        rescored(rescored_sop, 0.2, study),
        received(refused, study, eligible=False, storage_uri="file:///store/4.dcm"),
        prediction(refused, 0.1, "3", study),
    )
    async with agg.sessions() as s:
        plan = await plan_rescore(s, "3")
        assert await plan_rescore(s, "7") is not None and not (await plan_rescore(s, "7")).targets
    assert [t.sop_uid for t in plan.targets] == [on_v3] and plan.studies == {study}
    items = requests(plan, "model version 3 withdrawn", request_id="r9")
    assert [(i.routing_key, i.message_id) for i in items] == [(ROUTING_KEY, f"rescore:r9:{on_v3}")]
    msg = items[0].message
    assert isinstance(msg, RescoreRequested)
    assert msg.withdrawn_model_version == "3" and msg.image.storage_uri == "file:///store/1.dcm"
    assert msg.image.sha256 == "ab" * 32 and msg.HasField("received_at")
