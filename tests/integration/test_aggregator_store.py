"""The evidence store on SQLite and PostgreSQL: labeling aggregates (out of order, duplicated),
date filters, and two replicas applying one study's events at the same time."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from services.aggregator.config import AggregatorSettings
from services.aggregator.models import Study, TriageHistory
from services.aggregator.service import Aggregator
from services.aggregator.web.queries import list_studies
from services.core.contracts import Answer, LabelAggregate
from services.core.db import make_engine
from tests.support.aggregator_service import judgment, message_id, prediction, received, ref, write_test_policy
from tests.support.postgres import postgres  # noqa: F401


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    if request.param == "postgres":
        yield request.getfixturevalue("postgres").url
    else:
        yield f"sqlite+aiosqlite:///{tmp_path / 'aggregator.db'}"


async def replica(url: str, tmp_path: Path) -> Aggregator:
    settings = AggregatorSettings(data_dir=tmp_path, policy_file=write_test_policy(tmp_path / "p.yaml"), secret_key="x")
    agg = Aggregator(settings, engine=make_engine(url))
    await agg.migrate()
    return agg


async def apply(agg: Aggregator, msg: object, attempts: int = 20) -> None:
    """Apply like the consumer does, retrying on a DB conflict as the broker's retry path would."""
    for attempt in range(attempts):
        try:
            async with agg.sessions() as s:
                change = await agg.store.apply(s, msg, trigger=message_id(msg))
                await s.commit()
            agg.after_commit(change)
            return
        except DBAPIError:
            await asyncio.sleep(0.05 * (attempt + 1))  # the retry's back-off (the broker's), not synchronisation
    raise AssertionError("never applied")


def aggregate(sop: str, study: str, p: float, revision: int) -> LabelAggregate:
    return LabelAggregate(
        image=ref(sop, study),
        p_pneumonia=p,
        final_label=Answer.ANSWER_PNEUMONIA if p >= 0.5 else Answer.ANSWER_HEALTHY,
        judgments=3,
        revision=revision,
        method="dawid_skene",
    )


async def test_label_aggregates_latest_revision_wins_and_duplicates_change_nothing(
    database_url: str, tmp_path: Path
) -> None:
    agg = await replica(database_url, tmp_path)
    try:
        study = f"2.25.{uuid.uuid4().int}"
        sop = study + ".1"
        await apply(agg, received(sop, study))
        await apply(agg, prediction(sop, 0.03, study=study))
        await apply(agg, aggregate(sop, study, 0.02, revision=2))
        await apply(agg, aggregate(sop, study, 0.99, revision=1))  # an older revision arriving late
        await apply(agg, aggregate(sop, study, 0.02, revision=2))  # a duplicate
        async with agg.sessions() as s:
            row = await s.get(Study, study)
            history = (await s.scalars(select(TriageHistory).where(TriageHistory.study_uid == study))).all()
        assert row is not None and row.flag == "LIKELY_HEALTHY"
        assert len(history) == row.revision
        # the crowd's aggregate leaning pneumonia withholds the rule-out
        await apply(agg, aggregate(sop, study, 0.75, revision=3))
        async with agg.sessions() as s:
            row = await s.get(Study, study)
        assert row is not None and row.flag == "UNCERTAIN" and "crowd leans pneumonia" in row.reason
    finally:
        await agg.engine.dispose()


async def test_two_replicas_on_one_study_end_consistent(database_url: str, tmp_path: Path) -> None:
    a, b = await replica(database_url, tmp_path), await replica(database_url, tmp_path)
    try:
        study = f"2.25.{uuid.uuid4().int}"
        sops = [f"{study}.{i}" for i in range(3)]
        events = [received(s, study) for s in sops] + [prediction(s, 0.4, study=study) for s in sops]
        events += [judgment(s, f"{s}-j{k}", k % 2 == 0, study=study) for s in sops for k in range(4)]
        await asyncio.gather(*(apply(a if i % 2 else b, e) for i, e in enumerate(events)))
        async with a.sessions() as s:
            row = await s.get(Study, study)
            revs = (await s.scalars(select(TriageHistory.revision).where(TriageHistory.study_uid == study))).all()
        assert row is not None and row.human_judgments == 12
        assert sorted(revs) == list(range(1, row.revision + 1))
        # the final result is what one replica alone computes from the same evidence
        async with b.sessions() as s:
            study_row = await s.get(Study, study)
            assert study_row is not None
            assert await b.store.recompute(s, study_row) is None
    finally:
        await a.engine.dispose()
        await b.engine.dispose()


async def test_worklist_date_filter(tmp_path: Path) -> None:
    agg = await replica(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", tmp_path)
    try:
        old, new = received("3.1.1", "3.1"), received("3.2.1", "3.2")
        old.received_at.FromDatetime(datetime.now(UTC) - timedelta(days=3))
        for msg in (old, new, prediction("3.1.1", 0.97, study="3.1"), prediction("3.2.1", 0.97, study="3.2")):
            await apply(agg, msg)
        today = datetime.now(UTC).date()
        async with agg.sessions() as s:
            recent, _ = await list_studies(s, date_from=today - timedelta(days=1))
            older, _ = await list_studies(s, date_to=today - timedelta(days=2))
            both, total = await list_studies(s, flags=["URGENT"])
        assert [x["study_uid"] for x in recent] == ["3.2"]
        assert [x["study_uid"] for x in older] == ["3.1"]
        assert total == 2 and [x["study_uid"] for x in both] == ["3.1", "3.2"]  # same flag: by arrival
    finally:
        await agg.engine.dispose()
