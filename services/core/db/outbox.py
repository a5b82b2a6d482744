"""Transactional outbox: producers add the event in the same transaction as their own rows; the
relay publishes with broker confirms and marks it sent. A broker outage only delays events.

Delivery is at-least-once (a crash between the confirm and the commit re-sends the event with the
same message id); consumers are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message
from prometheus_client import Gauge
from sqlalchemy import DateTime, Integer, LargeBinary, String, Text, func, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from services.core.broker import Broker
from services.core.contracts import ROUTING_KEY_BY_MESSAGE

log = logging.getLogger(__name__)

OUTBOX_BACKLOG = Gauge("pt_outbox_backlog", "Events committed but not yet confirmed by the broker", ["service"])


def utcnow() -> datetime:
    return datetime.now(UTC)


class OutboxMixin:
    """Columns of an outbox table; a service declares `class Outbox(OutboxMixin, Base)`."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    message_id: Mapped[str] = mapped_column(String(200), unique=True)
    routing_key: Mapped[str] = mapped_column(String(100))
    payload: Mapped[bytes] = mapped_column(LargeBinary)
    correlation_id: Mapped[str | None] = mapped_column(String(200), nullable=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


def outbox_row(message: Message, *, message_id: str, correlation_id: str | None = None) -> dict[str, Any]:
    """Column values of the outbox row for `message` (for callers that insert with SQLAlchemy Core)."""
    return {
        "message_id": message_id,
        "routing_key": ROUTING_KEY_BY_MESSAGE[message.DESCRIPTOR.full_name],
        "payload": message.SerializeToString(),
        "correlation_id": correlation_id,
    }


def add_event(
    session: AsyncSession,
    model: type[OutboxMixin],
    message: Message,
    *,
    message_id: str,
    correlation_id: str | None = None,
) -> OutboxMixin:
    """Stage an event in the caller's transaction (commit is the caller's)."""
    row = model(**outbox_row(message, message_id=message_id, correlation_id=correlation_id))
    session.add(row)
    return row


class OutboxRelay:
    def __init__(
        self,
        service: str,
        sessions: async_sessionmaker[AsyncSession],
        model: type[OutboxMixin],
        broker: Broker,
        batch_size: int = 200,
        idle_seconds: float = 0.5,
        max_backoff_seconds: float = 5.0,
    ) -> None:
        self.service = service
        self.sessions = sessions
        self.model = model
        self.broker = broker
        self.batch_size = batch_size
        self.idle_seconds = idle_seconds
        self.max_backoff_seconds = max_backoff_seconds
        self._wake = asyncio.Event()

    def notify(self) -> None:
        """Tell the relay that new events were committed (so it does not wait for the next poll)."""
        self._wake.set()

    async def backlog(self) -> int:
        async with self.sessions() as session:
            n = await session.scalar(
                select(func.count()).select_from(self.model).where(self.model.published_at.is_(None))
            )
        return int(n or 0)

    async def run_once(self) -> int:
        """Publish one batch of pending events; returns how many were confirmed."""
        from services.core.contracts import MESSAGE_BY_ROUTING_KEY

        sent = 0
        async with self.sessions() as session:
            rows = (
                await session.scalars(
                    select(self.model)
                    .where(self.model.published_at.is_(None))
                    .order_by(self.model.id)
                    .limit(self.batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            try:
                for row in rows:
                    message = MESSAGE_BY_ROUTING_KEY[row.routing_key].FromString(row.payload)
                    row.attempts += 1
                    await self.broker.publish(
                        row.routing_key, message, message_id=row.message_id, correlation_id=row.correlation_id
                    )
                    row.published_at = utcnow()
                    sent += 1
            except Exception as exc:
                for row in rows:
                    if row.published_at is None:
                        row.last_error = repr(exc)[:1000]
                await session.commit()
                raise
            await session.commit()
        return sent

    async def run(self, stop: asyncio.Event | None = None) -> None:
        backoff = self.idle_seconds
        stop = stop or asyncio.Event()
        while not stop.is_set():
            # Clear before the work, not after: a notify() that arrives while run_once() runs (its
            # events may have committed after our SELECT) must wake the next round immediately.
            self._wake.clear()
            try:
                sent = await self.run_once()
                OUTBOX_BACKLOG.labels(self.service).set(await self.backlog())
                backoff = self.idle_seconds
                if sent >= self.batch_size:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("outbox relay cannot publish yet", extra={"error": repr(exc), "retry_in_s": backoff})
                backoff = min(backoff * 2, self.max_backoff_seconds)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            except TimeoutError:
                pass
