"""SRs for backfill studies (issue 24, item 2): by default sent and marked retrospective in the SR's
content; with PT_AGGREGATOR_BACKFILL_SR=false none is queued, while a fresh study's SR still is."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from services.aggregator.models import SrDelivery, Study
from services.aggregator.service import Aggregator
from services.aggregator.sr import RETROSPECTIVE, build_sr
from services.core.lanes import BACKFILL
from tests.support.aggregator_service import apply_events, offline_aggregator_fixture, prediction, received  # noqa: F401

FRESH_STUDY, OLD_STUDY = "1.2.826.0.1.24.11", "1.2.826.0.1.24.12"


async def _flag_both(agg: Aggregator) -> None:
    old_image, old_pred = received("1.2.24.12.1", OLD_STUDY), prediction("1.2.24.12.1", 0.97, study=OLD_STUDY)
    old_image.image.lane = old_pred.image.lane = BACKFILL
    await apply_events(agg, old_image, old_pred, received("1.2.24.11.1", FRESH_STUDY))
    await apply_events(agg, prediction("1.2.24.11.1", 0.97, study=FRESH_STUDY))


async def _queued(agg: Aggregator) -> set[str]:
    async with agg.sessions() as s:
        return {d.study_uid for d in (await s.scalars(select(SrDelivery))).all()}


@pytest.mark.parametrize(
    "offline_aggregator", [{"sr_destination": "127.0.0.1:9:PACS"}], indirect=True, ids=["backfill-sr-on"]
)
async def test_backfill_sr_is_marked_retrospective(offline_aggregator: Aggregator) -> None:
    await _flag_both(offline_aggregator)
    assert await _queued(offline_aggregator) == {FRESH_STUDY, OLD_STUDY}
    texts = {}
    async with offline_aggregator.sessions() as s:
        for uid in (FRESH_STUDY, OLD_STUDY):
            study = await s.get(Study, uid)
            assert study is not None
            report, header = await offline_aggregator.study_report(s, study)
            ds = build_sr(report, header)
            texts[uid] = [str(item.get("TextValue", "")) for item in ds.ContentSequence]
    assert RETROSPECTIVE in texts[OLD_STUDY]
    assert RETROSPECTIVE not in texts[FRESH_STUDY]


@pytest.mark.parametrize(
    "offline_aggregator",
    [{"sr_destination": "127.0.0.1:9:PACS", "backfill_sr": False}],
    indirect=True,
    ids=["backfill-sr-off"],
)
async def test_no_sr_for_backfill_when_switched_off(offline_aggregator: Aggregator) -> None:
    await _flag_both(offline_aggregator)
    assert await _queued(offline_aggregator) == {FRESH_STUDY}
