"""Database writes of the ingest besides stored instances (those are in commit.py).

- record_refusal: the rejection row (attempts counted) + one ImageRejected event per SOP instance
  and reason, however often the sender retries. A non-image discarded under
  PT_INGEST_OUT_OF_SCOPE=accept-and-discard is recorded the same way with the status it was
  answered, 0x0000 (a row and event with dicom_status 0 and stored=false is a discard).
"""

from __future__ import annotations

from datetime import UTC, datetime

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.core.contracts import ImageRef, ImageRejected
from services.core.db.outbox import add_event
from services.ingest.models import Instance, Outbox, Rejection
from services.ingest.validate import Decision

PRODUCER = "ingest"


def message_id(sop_instance_uid: str, suffix: str = "") -> str:
    return f"{PRODUCER}:{sop_instance_uid}{':' + suffix if suffix else ''}"


def to_timestamp(when: datetime) -> Timestamp:
    ts = Timestamp()
    ts.FromDatetime(when)
    return ts


async def is_stored(sessions: async_sessionmaker[AsyncSession], sop_instance_uid: str) -> bool:
    async with sessions() as session:
        found = await session.scalar(select(Instance.id).where(Instance.sop_instance_uid == sop_instance_uid))
    return found is not None


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
            existing.dicom_status = decision.status  # the last answer (refused, or discarded since)
            existing.reason = decision.reason
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
            received_at=to_timestamp(now),
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
