"""image.received -> a labeling task (skip images not eligible for triage or refused by the input gate;
idempotent on SOP uid)."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Callable
from pathlib import Path

from prometheus_client import Counter
from sqlalchemy import bindparam, exists, insert, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.core.broker import Envelope, PermanentError
from services.core.contracts import ImageReceived
from services.core.db.outbox import utcnow
from services.core.gate import BORDERLINE, GateVerdict
from services.core.lanes import BACKFILL
from services.labeling.intake import Prepared, prepare_work_image
from services.labeling.job import JobDefinition
from services.labeling.models import SkippedImage, Task, opaque_id
from services.labeling.render import path_from_uri

log = logging.getLogger(__name__)
TASKS_CREATED = Counter(
    "pt_labeling_tasks_created_total",
    "image.received events by outcome (created | duplicate | skipped_not_eligible | skipped_gate | skipped_backfill)",
    ["outcome"],
)
SKIPPED = Counter(
    "pt_labeling_images_skipped_total",
    "Images the input gate refused: no crowd task (reason: the gate's rule, services.core.gate.CHECKS)",
    ["reason"],
)
BORDERLINE_TASKS = Counter("pt_labeling_borderline_tasks_total", "Tasks of images the input gate called borderline")

# prepare(cache_dir, task_id, source, max_side) -> Prepared: gate, then render the PNG unless refused
Prepare = Callable[[Path, str, Path, int], Prepared]


class ImageConsumer:
    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        job: JobDefinition,
        render_dir: Path,
        max_side: int,
        gate_file: str | None = None,
        prepare: Prepare | None = None,
        backfill_crowd: str = "none",
        backfill_sample: float = 0.05,
    ) -> None:
        """gate_file: the input gate's model (None: gate off). prepare: gate + render (default
        services.labeling.intake.prepare_work_image with gate_file); runs with no transaction open."""
        self.engine: AsyncEngine = sessions.kw["bind"]  # Core statements only (see handle)
        sop = bindparam("sop")
        self._seen = select(
            or_(exists().where(Task.sop_instance_uid == sop), exists().where(SkippedImage.sop_instance_uid == sop))
        )
        self._insert_task = insert(Task)
        self._insert_skipped = insert(SkippedImage)
        self.job = job
        self.render_dir = render_dir
        self.max_side = max_side
        self.prepare: Prepare = prepare or functools.partial(prepare_work_image, gate_file=gate_file)
        self.backfill_crowd = backfill_crowd
        self.backfill_sample = backfill_sample

    def crowd_takes_backfill(self, sop_instance_uid: str) -> bool:
        """Does a backfill image become a crowd task (PT_LABELING_BACKFILL_CROWD)? A sample is chosen
        by the UID's hash, so a redelivery decides the same."""
        if self.backfill_crowd == "all":
            return True
        if self.backfill_crowd != "sample":
            return False
        share = int.from_bytes(hashlib.sha256(sop_instance_uid.encode()).digest()[:8], "big") / 2**64
        return share < self.backfill_sample

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
        if envelope.lane == BACKFILL and not self.crowd_takes_backfill(sop):
            TASKS_CREATED.labels("skipped_backfill").inc()  # the crowd labels today's patients
            return
        # Core statements on a pooled connection, not ORM sessions: the same SELECT / INSERT, about
        # a third of the CPU per image (bench/consumers_cpu.py).
        async with self.engine.connect() as conn:
            if await conn.scalar(self._seen, {"sop": sop}):  # a task, or skipped by the gate before
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
        # Gate and render once now (a broken image is refused here, not shown to annotators), before
        # the write transaction: the slow decode must not hold SQLite's single writer lock.
        try:
            prepared = await asyncio.to_thread(self.prepare, self.render_dir, task["id"], source, self.max_side)
        except Exception as exc:
            raise PermanentError(f"cannot render the image: {exc!r}") from exc
        gate = prepared.gate
        if gate is not None and prepared.refused:
            await self._skip(msg, gate)
            return
        if gate is not None:
            task |= {
                "gate_verdict": gate.verdict,
                "gate_reason": gate.reason or None,
                "gate_score": gate.score,
                "gate_version": gate.version,
            }
        try:
            async with self.engine.begin() as conn:
                await conn.execute(self._insert_task, task)
        except IntegrityError:  # a concurrent redelivery created it first (rolled back)
            if prepared.png is not None:
                prepared.png.unlink(missing_ok=True)  # our PNG, under our unused task id
            TASKS_CREATED.labels("duplicate").inc()
            return
        TASKS_CREATED.labels("created").inc()
        if gate is not None and gate.verdict == BORDERLINE:
            BORDERLINE_TASKS.inc()
        log.info("labeling task created", extra={"task_id": task["id"], "gate": gate.verdict if gate else "off"})

    async def _skip(self, msg: ImageReceived, gate: GateVerdict) -> None:
        """No task for an image the model may not judge: record why (owner page, /metrics), nothing else."""
        row = {
            "sop_instance_uid": msg.image.sop_instance_uid,
            "study_instance_uid": msg.image.study_instance_uid,
            "storage_uri": msg.image.storage_uri,
            "sha256": msg.image.sha256,
            "gate_check": gate.check or "other",
            "reason": gate.reason,
            "gate_score": gate.score,
            "gate_version": gate.version,
            "job_key": self.job.key,
            "skipped_at": utcnow(),
        }
        try:
            async with self.engine.begin() as conn:
                await conn.execute(self._insert_skipped, row)
        except IntegrityError:  # a concurrent redelivery recorded it first
            TASKS_CREATED.labels("duplicate").inc()
            return
        TASKS_CREATED.labels("skipped_gate").inc()
        SKIPPED.labels(row["gate_check"]).inc()
        log.info("image refused by the input gate: no labeling task", extra={"gate_reason": gate.reason})
