"""Labeling renders each new image's PNG (a slow decode) with no database transaction open: SQLite
has one writer, and a render inside the insert's transaction stalled every other write (answers,
aggregation, the outbox) for its whole duration. Real SQLite file, real DICOM, real renderer; the
render step is wrapped to probe, from a second connection, whether the write lock is free."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from services.core.broker import Envelope
from services.core.contracts import ImageReceived, ImageRef
from services.core.db import make_engine, make_sessionmaker, upgrade
from services.labeling.app import record_job
from services.labeling.config import LabelingSettings
from services.labeling.consumer import ImageConsumer
from services.labeling.intake import Prepared, prepare_work_image
from services.labeling.job import load_job
from services.labeling.models import Base, Task


@pytest.fixture
async def labeling_db(tmp_path: Path) -> AsyncIterator[tuple[Any, LabelingSettings]]:
    settings = LabelingSettings(data_dir=tmp_path)
    engine = make_engine(settings.database_url_for("labeling"))
    await upgrade(engine, "labeling", Base.metadata)
    sessions = make_sessionmaker(engine)
    await record_job(sessions, load_job(settings.labeling_job_file))
    try:
        yield sessions, settings
    finally:
        await engine.dispose()


def envelope(sop: str, dcm: Path) -> Envelope:
    msg = ImageReceived(
        image=ImageRef(study_instance_uid="1.2.9", series_instance_uid="1.2.9.1", sop_instance_uid=sop),
        triage_eligible=True,
        modality="DX",
    )
    msg.image.storage_uri = dcm.as_uri()
    return Envelope("image.received", msg, f"ingest:{sop}", sop, {}, False, 0, raw=None)  # type: ignore[arg-type]


async def test_png_is_rendered_outside_the_write_transaction(
    labeling_db: tuple[Any, LabelingSettings], shared_data: Path
) -> None:
    sessions, settings = labeling_db
    db = settings.data_dir / "labeling.db"
    lock_state: list[str] = []

    def probing_prepare(cache_dir: Path, task_id: str, source: Path, max_side: int) -> Prepared:
        other = sqlite3.connect(db, timeout=0)  # another writer (an answer, the outbox relay)
        try:
            other.execute("BEGIN IMMEDIATE")
            other.rollback()
            lock_state.append("free")
        except sqlite3.OperationalError as exc:
            lock_state.append(str(exc))
        finally:
            other.close()
        return prepare_work_image(cache_dir, task_id, source, max_side, settings.resolved_gate_file())

    job = load_job(settings.labeling_job_file)
    consumer = ImageConsumer(sessions, job, settings.render_dir(), 256, prepare=probing_prepare)
    dcm = sorted((shared_data / "dicom").glob("*.dcm"))[0]
    await consumer.handle(envelope("1.2.9.1.1", dcm))
    assert lock_state == ["free"], "the PNG was rendered while a write transaction held the database"

    async with sessions() as s:
        task = (await s.scalars(select(Task).where(Task.sop_instance_uid == "1.2.9.1.1"))).one()
    assert (settings.render_dir() / f"{task.id}.png").stat().st_size > 0
    # a redelivery neither renders again nor creates a second task
    await consumer.handle(envelope("1.2.9.1.1", dcm))
    async with sessions() as s:
        assert await s.scalar(select(func.count()).select_from(Task).where(Task.kind == "work")) == 1
    assert lock_state == ["free"]
    assert sorted(p.name for p in settings.render_dir().glob("*.png")) == [f"{task.id}.png"]
