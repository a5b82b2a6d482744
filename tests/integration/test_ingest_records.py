"""Group commit of instances (real SQLite file), through both committers (writer thread; event loop as
used with PostgreSQL): concurrent records, duplicates, one bad row isolated."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.core.contracts import ImageReceived
from services.core.db import make_engine, make_sessionmaker, upgrade
from services.ingest.commit import LoopCommitter, ThreadCommitter
from services.ingest.models import Base, Instance, Outbox, Study
from services.ingest.store import StoredFile
from services.ingest.validate import Action, Decision
from tests.support.postgres import postgres  # noqa: F401


def _decision(i: int, study: str = "1.2.3.4") -> Decision:
    return Decision(
        Action.ACCEPT,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        sop_instance_uid=f"1.2.3.4.5.{i}",
        study_instance_uid=study,
        series_instance_uid=f"{study}.1",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        modality="DX",
        body_part_examined="CHEST",
        view_position="PA",
        rows=10,
        columns=10,
        photometric_interpretation="MONOCHROME2",
        patient_age_years=4,
    )


def _stored(i: int, tmp: Path) -> StoredFile:
    return StoredFile(f"{i:064x}", tmp / f"{i}.dcm", 100, created=True)


KINDS = ["thread-sqlite", "loop-sqlite", pytest.param("loop-postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=KINDS)
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[str, str, AsyncEngine]]:
    kind, backend = request.param.split("-")
    url = f"sqlite+aiosqlite:///{tmp_path / 'ingest.db'}"
    if backend == "postgres":
        url = request.getfixturevalue("postgres").url
    engine = make_engine(url)
    await upgrade(engine, "ingest", Base.metadata)
    if backend == "postgres":  # a shared cluster: start from empty ingest tables
        async with engine.begin() as conn:
            for table in ("ingest_outbox", "ingest_instances", "ingest_series", "ingest_studies"):
                await conn.execute(text(f"DELETE FROM {table}"))
    try:
        yield kind, url, engine
    finally:
        await engine.dispose()


@pytest.fixture
async def committer(db: tuple[str, str, AsyncEngine]) -> AsyncIterator[Committer]:
    kind, url, engine = db
    c: Committer = ThreadCommitter(url) if kind == "thread" else LoopCommitter(engine, asyncio.get_running_loop())
    c.start()
    try:
        yield c
    finally:
        await c.stop()


@pytest.fixture
def sessions(db: tuple[str, str, AsyncEngine]) -> async_sessionmaker[AsyncSession]:
    return make_sessionmaker(db[2])


Committer = ThreadCommitter | LoopCommitter


async def record(c: Committer, decision: Decision, stored: StoredFile) -> ImageReceived | None:
    return await asyncio.wrap_future(c.submit(decision, stored, "AE"))


async def _count(sessions: async_sessionmaker[AsyncSession], model: type) -> int:
    async with sessions() as s:
        return int(await s.scalar(select(func.count()).select_from(model)) or 0)


async def test_concurrent_records_share_commits_and_stay_exact(
    committer: Committer, sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    results = await asyncio.gather(*(record(committer, _decision(i), _stored(i, tmp_path)) for i in range(30)))
    assert all(r is not None for r in results)
    assert sorted(r.study_image_count for r in results if r) == list(range(1, 31))
    # a repeat — also three times at once — gives no new event
    again = await asyncio.gather(*(record(committer, _decision(5), _stored(5, tmp_path)) for _ in range(3)))
    assert again == [None, None, None]
    # a new instance arriving twice at once: one event
    twice = await asyncio.gather(*(record(committer, _decision(30), _stored(30, tmp_path)) for _ in range(2)))
    assert sorted(r is None for r in twice) == [False, True]
    assert await _count(sessions, Instance) == 31
    assert await _count(sessions, Outbox) == 31
    async with sessions() as s:
        assert await s.scalar(select(Study.image_count)) == 31


async def test_a_failing_row_does_not_fail_its_batch(
    committer: Committer, sessions: async_sessionmaker[AsyncSession], tmp_path: Path
) -> None:
    bad = _decision(99)
    bad.sop_instance_uid = None  # type: ignore[assignment]  # NOT NULL violation
    results = await asyncio.gather(
        *(record(committer, _decision(i, "9.9"), _stored(i, tmp_path)) for i in range(5)),
        record(committer, bad, _stored(99, tmp_path)),
        *(record(committer, _decision(i, "9.9"), _stored(i, tmp_path)) for i in range(5, 10)),
        return_exceptions=True,
    )
    assert isinstance(results[5], Exception)
    assert all(r is not None and not isinstance(r, Exception) for i, r in enumerate(results) if i != 5)
    assert await _count(sessions, Instance) == 10
    assert await _count(sessions, Outbox) == 10


def test_a_batch_is_a_fixed_number_of_statements_with_exact_counts(tmp_path: Path) -> None:
    """record_batch on a real SQLite file: 3 studies, 4 series, 40 instances of which one is stored
    already and one comes twice in the batch (two worker processes sending it at once). Each study's
    image counts run on from what was stored; one statement per distinct study and series plus three,
    whatever the number of instances (the committer's time per image does not grow with the batch)."""
    from sqlalchemy import create_engine, event

    from services.ingest.commit import record_batch
    from services.ingest.models import Series

    engine = create_engine(f"sqlite:///{tmp_path / 'ingest.db'}")
    Base.metadata.create_all(engine)
    with engine.begin() as conn:
        assert record_batch(conn, [(_decision(0, "1.1"), _stored(0, tmp_path), "AE")])[0] is not None
    items = []
    for i in range(40):
        study = ("1.1", "2.2", "3.3")[i % 3]
        d = _decision(i, study)
        d.series_instance_uid = f"{study}.{1 + (i % 2) * (study == '1.1')}"  # study 1.1 has two series
        items.append((d, _stored(i, tmp_path), "AE"))
    items.append((_decision(7, "2.2"), _stored(7, tmp_path), "AE"))  # 7 again, same batch
    statements: list[str] = []
    event.listen(engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    with engine.begin() as conn:
        results = record_batch(conn, items)
    assert results[0] is None and results[40] is None  # stored before; repeated within the batch
    written = [r for r in results if r is not None]
    assert len(written) == 39
    for study, expected in (("1.1", range(2, 15)), ("2.2", range(1, 14)), ("3.3", range(1, 14))):
        assert [r.study_image_count for r in written if r.image.study_instance_uid == study] == list(expected)
    assert len(statements) == 1 + 3 + 4 + 2  # stored?, studies, series, instances + outbox (executemany)
    with engine.connect() as conn:
        assert conn.scalar(select(func.count()).select_from(Instance)) == 40
        assert conn.scalar(select(func.count()).select_from(Outbox)) == 40
        assert conn.scalar(select(func.count()).select_from(Series)) == 4
        counts = dict(conn.execute(select(Study.study_instance_uid, Study.image_count)).all())
    assert counts == {"1.1": 14, "2.2": 13, "3.3": 13}
    engine.dispose()
