"""Database writes of the ingest: one transaction per instance (rows + outbox event together).

- record_stored: study/series/instance rows + the ImageReceived outbox row, committed together;
  returns None when the SOP instance was already stored (idempotent: no second event).
- record_refusal: the rejection row (attempts counted) + one ImageRejected event per SOP instance
  and reason, however often the sender retries.
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select
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


async def _get_or_create_study(session: AsyncSession, uid: str) -> Study:
    study = await session.scalar(select(Study).where(Study.study_instance_uid == uid))
    if study is None:
        study = Study(study_instance_uid=uid, image_count=0)
        session.add(study)
        await session.flush()
    return study


async def _get_or_create_series(session: AsyncSession, uid: str, study: Study, modality: str) -> Series:
    series = await session.scalar(select(Series).where(Series.series_instance_uid == uid))
    if series is None:
        series = Series(series_instance_uid=uid, study_id=study.id, modality=modality)
        session.add(series)
        await session.flush()
    return series


async def record_stored(
    sessions: async_sessionmaker[AsyncSession], decision: Decision, stored: StoredFile, calling_ae: str
) -> ImageReceived | None:
    """Commit the instance and its ImageReceived event; None when it was a duplicate."""
    now = datetime.now(UTC)
    async with sessions() as session:
        try:
            if await session.scalar(select(Instance.id).where(Instance.sop_instance_uid == decision.sop_instance_uid)):
                return None
            study = await _get_or_create_study(session, decision.study_instance_uid)
            series = await _get_or_create_series(session, decision.series_instance_uid, study, decision.modality)
            study.image_count += 1
            instance = Instance(
                sop_instance_uid=decision.sop_instance_uid,
                series_id=series.id,
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
                not_triaged_reason=decision.reason if not decision.triage_eligible else "",
                outside_intended_use=decision.outside_intended_use,
                calling_ae_title=calling_ae,
                received_at=now,
            )
            session.add(instance)
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
                study_image_count=study.image_count,
                not_triaged_reason=decision.reason if not decision.triage_eligible else "",
            )
            add_event(
                session,
                Outbox,
                event,
                message_id=message_id(decision.sop_instance_uid),
                correlation_id=decision.sop_instance_uid,
            )
            await session.commit()
        except IntegrityError:
            # a concurrent association stored the same instance first: that one owns the event
            await session.rollback()
            if await is_stored(sessions, decision.sop_instance_uid):
                return None
            raise
    return event


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
