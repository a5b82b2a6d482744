"""Backfill policy of the crowd (issue 24, item 2): with PT_LABELING_BACKFILL_CROWD=none (the
default) a backfill image becomes no crowd task, `sample` labels a fixed share chosen by UID (a
redelivery decides the same), `all` labels every one; a fresh image is always a task. Real SQLite,
real DICOM files, the service's ImageConsumer (the lane comes from the queue it was consumed from)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from services.core.broker import Envelope
from services.core.contracts import ImageReceived, ImageRef
from services.core.db import make_engine, make_sessionmaker, upgrade
from services.core.lanes import BACKFILL, FRESH
from services.labeling.app import record_job
from services.labeling.config import LabelingSettings
from services.labeling.consumer import ImageConsumer
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


def envelope(sop: str, dcm: Path, lane: str) -> Envelope:
    msg = ImageReceived(
        image=ImageRef(study_instance_uid=f"{sop}.9", series_instance_uid=f"{sop}.8", sop_instance_uid=sop, lane=lane),
        triage_eligible=True,
        modality="DX",
    )
    msg.image.storage_uri = dcm.as_uri()
    key = "image.received" + (".backfill" if lane == BACKFILL else "")
    return Envelope(key, msg, f"ingest:{sop}", sop, {}, False, 0, raw=None, lane=lane)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["none", "sample", "all"])
async def test_backfill_images_reach_the_crowd_only_by_policy(
    labeling_db: tuple[Any, LabelingSettings], shared_data: Path, policy: str
) -> None:
    sessions, settings = labeling_db
    consumer = ImageConsumer(
        sessions,
        load_job(settings.labeling_job_file),
        settings.render_dir(),
        128,
        gate_file=None,
        backfill_crowd=policy,
        backfill_sample=0.3,
    )
    chest = sorted((shared_data / "dicom").glob("*.dcm"))[0]
    backfill = [f"1.2.24.{i}" for i in range(40)]
    for sop in backfill:
        await consumer.handle(envelope(sop, chest, BACKFILL))
    await consumer.handle(envelope(backfill[0], chest, BACKFILL))  # redelivered: decided the same
    await consumer.handle(envelope("1.2.24.fresh", chest, FRESH))
    async with sessions() as s:
        tasks = set((await s.scalars(select(Task.sop_instance_uid).where(Task.kind == "work"))).all())
    assert "1.2.24.fresh" in tasks
    chosen = {sop for sop in backfill if consumer.crowd_takes_backfill(sop)}
    assert tasks - {"1.2.24.fresh"} == chosen
    expected = {"none": (0, 0), "sample": (4, 20), "all": (40, 40)}[policy]  # 30 % of 40, by hash
    assert expected[0] <= len(chosen) <= expected[1], len(chosen)
