"""image.received -> a labeling task (skip images not eligible for triage; idempotent on SOP uid)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter
from sqlalchemy import bindparam, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.core.broker import Envelope, PermanentError
from services.core.contracts import ImageReceived
from services.labeling.job import JobDefinition
from services.labeling.models import Task, opaque_id
from services.labeling.render import cached_png, path_from_uri

log = logging.getLogger(__name__)
TASKS_CREATED = Counter("pt_labeling_tasks_created_total", "Labeling tasks created from image.received", ["outcome"])


Render = Callable[[Path, str, Path, int], Path]


class ImageConsumer:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        job: JobDefinition,
        render_dir: Path,
        max_side: int,
        render: Render = cached_png,
    ) -> None:
        """render(cache_dir, task_id, source, max_side) -> PNG path; runs with no transaction open."""
        self.engine: AsyncEngine = sessions.kw["bind"]  # Core statements only (see handle)
        self._find_task = select(Task.id).where(Task.sop_instance_uid == bindparam("sop"))
        self._insert_task = insert(Task)
        self.job = job
        self.render_dir = render_dir
        self.max_side = max_side
        self.render = render

    async def handle(self, envelope: Envelope) -> None:
        msg = envelope.payload
        if not isinstance(msg, ImageReceived):
            raise PermanentError(f"unexpected message {type(msg).__name__}")
        if not msg.triage_eligible:
            TASKS_CREATED.labels("skipped_not_eligible").inc()
            return
        sop = msg.image.sop_instance_uid
        if not sop or not msg.image.storage_uri:
            raise PermanentError("image.received without sop_instance_uid or storage_uri")
        # Core statements on a pooled connection, not ORM sessions: the same SELECT / INSERT, about
        # a third of the CPU per image (bench/consumers_cpu.py).
        async with self.engine.connect() as conn:
            if await conn.scalar(self._find_task, {"sop": sop}) is not None:
                TASKS_CREATED.labels("duplicate").inc()
                return
        try:
            source = path_from_uri(msg.image.storage_uri)
        except ValueError as exc:
            raise PermanentError(str(exc)) from exc
        if not source.exists():
            raise FileNotFoundError("stored image not visible yet")  # transient: shared volume lag -> retry
        task = {
            "id": opaque_id(),  # known before the insert: the PNG is rendered first, outside any transaction
            "kind": "work",
            "sop_instance_uid": sop,
            "study_instance_uid": msg.image.study_instance_uid,
            "series_instance_uid": msg.image.series_instance_uid,
            "sop_class_uid": msg.image.sop_class_uid,
            "storage_uri": msg.image.storage_uri,
            "sha256": msg.image.sha256,
            "job_key": self.job.key,
            "needed": self.job.redundancy.judgments_per_image,
        }  # the other columns take their defaults (status open, created_at now, ...) as with the ORM
        # Render once now (a broken image is refused here, not shown to annotators), before the
        # write transaction: the slow decode must not hold SQLite's single writer lock.
        try:
            png = await asyncio.to_thread(self.render, self.render_dir, task["id"], source, self.max_side)
        except Exception as exc:
            raise PermanentError(f"cannot render the image: {exc!r}") from exc
        try:
            async with self.engine.begin() as conn:
                await conn.execute(self._insert_task, task)
        except IntegrityError:  # a concurrent redelivery created it first (rolled back)
            png.unlink(missing_ok=True)  # our PNG, under our unused task id
            TASKS_CREATED.labels("duplicate").inc()
            return
        TASKS_CREATED.labels("created").inc()
        log.info("labeling task created", extra={"task_id": task["id"]})
