"""Database writes of the ingest: an instance's rows and its outbox event always commit together.

- record_stored / GroupCommitter: study/series/instance rows + the ImageReceived outbox row in one
  transaction (GroupCommitter: the instances of concurrent associations share one transaction);
  None when the SOP instance was already stored (idempotent: no second event).
- record_refusal: the rejection row (attempts counted) + one ImageRejected event per SOP instance
  and reason, however often the sender retries.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.core.contracts import ImageReceived, ImageRef, ImageRejected
from services.core.db.outbox import add_event
from services.ingest.models import Instance, Outbox, Rejection, Series, Study
from services.ingest.store import StoredFile
from services.ingest.validate import Decision

PRODUCER = "ingest"


def message_id(sop_instance_uid: str, suffix: str = "") -> str:
    return f"{PRODUCER}:{sop_instance_uid}{':' + suffix if suffix else ''}"


def _timestamp(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


async def is_stored(sessions: async_sessionmaker[AsyncSession], sop_instance_uid: str) -> bool:
    async with sessions() as session:
        found = await session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid))
    return found is not None


def _upsert(session: AsyncSession, model: type) -> Any:
    """INSERT ... ON CONFLICT for the session's dialect (SQLite and PostgreSQL both have it)."""
    bind = session.bind
    if bind is not None and bind.dialect.name == "postgresql":
        return pg_insert(model)
    return sqlite_insert(model)


async def _study(session: AsyncSession, uid: str, now: datetime) -> tuple[int, int]:
    """(id, image count including this image) of the study, created on first sight: one statement."""
    stmt = _upsert(session, Study).values(study_instance_uid=uid, image_count=1, created_at=now)
    stmt = stmt.on_conflict_do_update(
        index_elements=[Study.study_instance_uid], set_={"image_count": Study.image_count + 1}
    ).returning(Study.id, Study.image_count)
    row = (await session.execute(stmt)).one()
    return int(row.id), int(row.image_count)


async def _series(session: AsyncSession, uid: str, study_id: int, modality: str, now: datetime) -> int:
    values = {"series_instance_uid": uid, "study_id": study_id, "modality": modality, "created_at": now}
    stmt = _upsert(session, Series).values(**values)
    stmt = stmt.on_conflict_do_update(  # a no-op update, so that RETURNING gives the existing id too
        index_elements=[Series.series_instance_uid], set_={"series_instance_uid": stmt.excluded.series_instance_uid}
    ).returning(Series.id)
    return int((await session.execute(stmt)).scalar_one())


async def _add_stored(
    session: AsyncSession, decision: Decision, stored: StoredFile, calling_ae: str
) -> ImageReceived | None:
    """Stage one instance and its event in the session's transaction; None when already stored."""
    now = datetime.now(UTC)
    if await session.scalar(select(Instance.id).where(Instance.sop_instance_uid == decision.sop_instance_uid)):
        return None
    study_id, study_count = await _study(session, decision.study_instance_uid, now)
    series_id = await _series(session, decision.series_instance_uid, study_id, decision.modality, now)
    not_triaged = decision.reason if not decision.triage_eligible else ""
    await session.execute(
        insert(Instance).values(
            sop_instance_uid=decision.sop_instance_uid,
            series_id=series_id,
            sop_class_uid=decision.sop_class_uid,
            transfer_syntax_uid=decision.transfer_syntax_uid,
            sha256=stored.sha256,
            storage_uri=stored.uri,
            size_bytes=stored.size,
            modality=decision.modality,
            body_part_examined=decision.body_part_examined,
            view_position=decision.view_position,
            rows=decision.rows,
            columns=decision.columns,
            photometric_interpretation=decision.photometric_interpretation,
            patient_age_years=decision.patient_age_years,
            triage_eligible=decision.triage_eligible,
            not_triaged_reason=not_triaged,
            outside_intended_use=decision.outside_intended_use,
            calling_ae_title=calling_ae,
            received_at=now,
        )
    )
    event = ImageReceived(
        image=ImageRef(
            study_instance_uid=decision.study_instance_uid,
            series_instance_uid=decision.series_instance_uid,
            sop_instance_uid=decision.sop_instance_uid,
            sop_class_uid=decision.sop_class_uid,
            storage_uri=stored.uri,
            sha256=stored.sha256,
        ),
        modality=decision.modality,
        body_part_examined=decision.body_part_examined,
        view_position=decision.view_position,
        transfer_syntax_uid=decision.transfer_syntax_uid,
        rows=decision.rows,
        columns=decision.columns,
        photometric_interpretation=decision.photometric_interpretation,
        patient_age_years=decision.patient_age_years,
        triage_eligible=decision.triage_eligible,
        outside_intended_use=decision.outside_intended_use,
        intended_use_note=decision.intended_use_note,
        calling_ae_title=calling_ae,
        received_at=_timestamp(now),
        study_image_count=study_count,
        not_triaged_reason=not_triaged,
    )
    uid = decision.sop_instance_uid
    add_event(session, Outbox, event, message_id=message_id(uid), correlation_id=uid)
    return event


async def record_stored(
    sessions: async_sessionmaker[AsyncSession], decision: Decision, stored: StoredFile, calling_ae: str
) -> ImageReceived | None:
    """Commit one instance and its ImageReceived event; None when it was a duplicate."""
    async with sessions() as session:
        try:
            event = await _add_stored(session, decision, stored, calling_ae)
            await session.commit()
        except IntegrityError:
            # another ingest process (shared PostgreSQL) stored the same instance first: it owns the event
            await session.rollback()
            if await is_stored(sessions, decision.sop_instance_uid):
                return None
            raise
    return event


@dataclass
class _Pending:
    decision: Decision
    stored: StoredFile
    calling_ae: str
    future: asyncio.Future[ImageReceived | None]


class GroupCommitter:
    """Commits the instances of all concurrent associations together: one transaction (one fsync)
    for whatever arrived while the previous commit ran. Each C-STORE still gets its answer only
    after the commit holding its rows; a failing batch is retried one instance per transaction, so
    one bad row never fails the others."""

    def __init__(self, sessions: async_sessionmaker[AsyncSession], max_batch: int = 64) -> None:
        self.sessions = sessions
        self.max_batch = max_batch
        self._queue: asyncio.Queue[_Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ingest-group-commit")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if not item.future.done():
                item.future.set_exception(RuntimeError("ingest is stopping"))

    async def record(self, decision: Decision, stored: StoredFile, calling_ae: str) -> ImageReceived | None:
        future: asyncio.Future[ImageReceived | None] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Pending(decision, stored, calling_ae, future))
        return await future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [item for item in batch if not item.future.done()]  # cancelled: sender gave up
            if batch:
                await self._commit(batch)

    async def _commit(self, batch: list[_Pending]) -> None:
        try:
            async with self.sessions() as session:
                results = [await _add_stored(session, p.decision, p.stored, p.calling_ae) for p in batch]
                await session.commit()
        except asyncio.CancelledError:
            raise
        except Exception:
            if len(batch) == 1:
                self._settle(batch[0], None, sys.exc_info()[1])
                return
            for item in batch:  # isolate the failing instance
                try:
                    result = await record_stored(self.sessions, item.decision, item.stored, item.calling_ae)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._settle(item, None, exc)
                else:
                    self._settle(item, result, None)
            return
        for item, result in zip(batch, results, strict=True):
            self._settle(item, result, None)

    @staticmethod
    def _settle(item: _Pending, result: ImageReceived | None, exc: BaseException | None) -> None:
        if item.future.done():
            return
        if exc is not None:
            item.future.set_exception(exc)
        else:
            item.future.set_result(result)


async def record_refusal(
    sessions: async_sessionmaker[AsyncSession], decision: Decision, calling_ae: str
) -> ImageRejected | None:
    """Record a refusal; returns the ImageRejected event when this is the first for (SOP uid, reason)."""
    now = datetime.now(UTC)
    uid = decision.sop_instance_uid or "unknown"
    async with sessions() as session:
        existing = await session.scalar(
            select(Rejection).where(Rejection.sop_instance_uid == uid, Rejection.reason_code == decision.reason_code)
        )
        if existing is not None:
            existing.attempts += 1
            existing.last_seen_at = now
            await session.commit()
            return None
        session.add(
            Rejection(
                sop_instance_uid=uid,
                sop_class_uid=decision.sop_class_uid,
                reason_code=decision.reason_code,
                reason=decision.reason,
                dicom_status=decision.status,
                calling_ae_title=calling_ae,
                first_seen_at=now,
                last_seen_at=now,
            )
        )
        event = ImageRejected(
            image=ImageRef(
                study_instance_uid=decision.study_instance_uid,
                series_instance_uid=decision.series_instance_uid,
                sop_instance_uid=uid,
                sop_class_uid=decision.sop_class_uid,
            ),
            reason_code=decision.reason_code,
            reason=decision.reason,
            dicom_status=decision.status,
            stored=False,
            calling_ae_title=calling_ae,
            received_at=_timestamp(now),
        )
        add_event(
            session,
            Outbox,
            event,
            message_id=message_id(uid, f"rejected:{decision.reason_code}"),
            correlation_id=uid,
        )
        try:
            await session.commit()
        except IntegrityError:
            await session.rollback()
            return None
    return event
