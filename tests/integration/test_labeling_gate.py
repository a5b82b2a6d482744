"""The labeling consumer applies the input gate before it makes a crowd task (issue 29): real SQLite
file, real DICOM files, the real gate model, the service's ImageConsumer (no broker: the end-to-end
test with RabbitMQ and inference is test_labeling_gate_e2e.py).

A refused image: no task, no PNG rendered, one labeling_skipped_images row with the rule and the
reason; its redelivery changes nothing. A borderline image: a task carrying the verdict. With the gate
off (PT_LABELING_GATE=false) every image is a task, as before."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select

from services.core.broker import Envelope
from services.core.contracts import ImageReceived, ImageRef
from services.core.db import make_engine, make_sessionmaker, upgrade
from services.labeling.app import record_job
from services.labeling.config import LabelingSettings
from services.labeling.consumer import ImageConsumer
from services.labeling.job import load_job
from services.labeling.models import Base, SkippedImage, Task
from services.labeling.stats import job_summary, skipped_images
from tests.support.gate_corpus import borderline_corpus, refusal_corpus


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
        image=ImageRef(study_instance_uid=f"{sop}.9", series_instance_uid=f"{sop}.8", sop_instance_uid=sop),
        triage_eligible=True,
        modality="DX",
    )
    msg.image.storage_uri = dcm.as_uri()
    return Envelope("image.received", msg, f"ingest:{sop}", sop, {}, False, 0, raw=None)  # type: ignore[arg-type]


def skipped_metric(reason: str) -> float:
    return REGISTRY.get_sample_value("pt_labeling_images_skipped_total", {"reason": reason}) or 0.0


async def test_refused_image_gets_no_task_and_borderline_is_marked(
    labeling_db: tuple[Any, LabelingSettings], shared_data: Path, tmp_path: Path
) -> None:
    sessions, settings = labeling_db
    consumer = ImageConsumer(
        sessions,
        load_job(settings.labeling_job_file),
        settings.render_dir(),
        256,
        gate_file=settings.resolved_gate_file(),
    )
    tiny = tmp_path / "tiny.dcm"
    tiny.write_bytes(dict(refusal_corpus(shared_data))["10 x 45"])
    low_res = tmp_path / "low.dcm"
    low_res.write_bytes(dict(borderline_corpus(shared_data))["chest at 160 px"])
    chest = sorted((shared_data / "dicom").glob("*.dcm"))[0]
    size_before = skipped_metric("size")

    await consumer.handle(envelope("1.2.29.1", tiny))
    await consumer.handle(envelope("1.2.29.1", tiny))  # redelivered: still one record, still no task
    await consumer.handle(envelope("1.2.29.2", low_res))
    await consumer.handle(envelope("1.2.29.3", chest))

    async with sessions() as s:
        tasks = {t.sop_instance_uid: t for t in (await s.scalars(select(Task).where(Task.kind == "work"))).all()}
        skipped = (await s.scalars(select(SkippedImage))).all()
        summary = await job_summary(s, load_job(settings.labeling_job_file))
        listed = await skipped_images(s)
    assert set(tasks) == {"1.2.29.2", "1.2.29.3"}
    assert [(k.sop_instance_uid, k.gate_check) for k in skipped] == [("1.2.29.1", "size")]
    assert skipped[0].reason.startswith("too small to read (10 × 45 px")
    assert skipped[0].gate_version and skipped[0].storage_uri == tiny.as_uri()
    assert skipped_metric("size") - size_before == 1  # counted once, not again on redelivery
    assert (tasks["1.2.29.2"].gate_verdict, tasks["1.2.29.2"].gate_reason) == (
        "borderline",
        "low resolution (160 × 160 px, 250 × 250 mm)",
    )
    assert (tasks["1.2.29.3"].gate_verdict, tasks["1.2.29.3"].gate_reason) == ("ok", None)
    assert tasks["1.2.29.3"].gate_score is not None and tasks["1.2.29.3"].gate_score > 0.9
    # only the tasks' PNGs were rendered: nothing for the refused image
    assert sorted(p.name for p in settings.render_dir().glob("*.png")) == sorted(f"{t.id}.png" for t in tasks.values())
    assert (summary["images"], summary["borderline_images"], summary["skipped_by_gate"]) == (2, 1, 1)
    assert summary["skipped_by_check"] == {"size": 1}
    assert [k["sop_instance_uid"] for k in listed] == ["1.2.29.1"]


async def test_gate_off_makes_every_image_a_task(
    labeling_db: tuple[Any, LabelingSettings], shared_data: Path, tmp_path: Path
) -> None:
    sessions, settings = labeling_db
    off = LabelingSettings(data_dir=settings.data_dir, labeling_gate=False)
    assert off.resolved_gate_file() is None
    consumer = ImageConsumer(sessions, load_job(off.labeling_job_file), off.render_dir(), 256, gate_file=None)
    tiny = tmp_path / "tiny.dcm"
    tiny.write_bytes(dict(refusal_corpus(shared_data))["10 x 10"])
    await consumer.handle(envelope("1.2.29.9", tiny))
    async with sessions() as s:
        task = (await s.scalars(select(Task).where(Task.kind == "work"))).one()
        assert await s.scalar(select(SkippedImage.id)) is None
    assert task.sop_instance_uid == "1.2.29.9" and task.gate_verdict is None
