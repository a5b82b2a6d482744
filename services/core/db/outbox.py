"""Transactional outbox: producers add the event in the same transaction as their own rows; the
relay publishes with broker confirms and marks it sent. A broker outage only delays events.

Delivery is at-least-once (a crash between the confirm and the commit re-sends the event with the
same message id); consumers are idempotent.

One relay round: select up to `batch_size` pending rows (id order; on PostgreSQL `FOR UPDATE SKIP
LOCKED`, so replicas' relays take disjoint rows), publish them all in id order with their confirms
outstanding together (Broker.publish_many: one round trip per batch, not per event), then in one
transaction mark the confirmed rows published and give every other row of the batch its error
(`last_error`, `attempts` + 1, `published_at` left NULL: the next round sends it again). A row that
fails does not stop the rest of its batch, so after a failure the retried rows may reach the queue
after later ones; consumers never relied on order across a retry (they de-duplicate by message id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import UTC, datetime
from typing import Any

from google.protobuf.message import Message
from prometheus_client import Gauge
from sqlalchemy import DateTime, Integer, LargeBinary, String, Table, Text, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from services.core.broker import Broker, Outgoing
from services.core.contracts import MESSAGE_BY_ROUTING_KEY, ROUTING_KEY_BY_MESSAGE

log = logging.getLogger(__name__)

OUTBOX_BACKLOG = Gauge("pt_outbox_backlog", "Events committed but not yet confirmed by the broker", ["service"])


# While events flow, pt_outbox_backlog is read from the table at most this often (seconds); while
# rounds hang or fail (a broker alarm blocks publishing, the broker is down) it is read this often.
BACKLOG_GAUGE_EVERY_S = 1.0

# Up to this many rows are marked with a cached `WHERE id = :id` statement run once per row; more
# with one `WHERE id IN (...)` (SQLite, measured: 0.33 vs 0.55 ms for one row, 1.7 vs 1.2 ms for 200).
SMALL_UPDATE = 16


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


class OutboxPublishError(Exception):
    """Some events of a relay round were not confirmed (they stay pending); `sent` others were."""

    def __init__(self, sent: int, failed: int, first: BaseException) -> None:
        super().__init__(f"{failed} of {sent + failed} events not confirmed, e.g. {first!r}")
        self.sent = sent
        self.failed = failed


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
        self._backlog_read_at = float("-inf")  # when pt_outbox_backlog was last read from the table

    async def _refresh_backlog_gauge(self, idle: bool) -> None:
        """pt_outbox_backlog from a COUNT query (~0.85 ms of CPU on SQLite, measured): after an idle
        round, else at most every BACKLOG_GAUGE_EVERY_S while events flow. Run after every round it
        cost as much as the round's publishes when events come one at a time."""
        now = time.monotonic()
        if idle or now - self._backlog_read_at >= BACKLOG_GAUGE_EVERY_S:
            self._backlog_read_at = now
            OUTBOX_BACKLOG.labels(self.service).set(await self.backlog())

    async def _keep_backlog_gauge_fresh(self) -> None:
        """Rounds refresh the gauge only when they return normally. A round whose publishes a
        RabbitMQ memory or disk alarm blocks waits for confirms until it times out, and failing
        rounds back off: meanwhile the gauge would stay at its last value (0 for a whole alarm, so
        the runbook's alert could never fire). Here it is read whenever it is older than
        BACKLOG_GAUGE_EVERY_S, alongside the rounds (no extra read while they keep it fresh)."""
        while True:
            await asyncio.sleep(BACKLOG_GAUGE_EVERY_S)  # a polling interval: the gauge's staleness bound
            try:
                await self._refresh_backlog_gauge(idle=False)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the database is down too: the next tick tries again
                log.debug("outbox backlog gauge not refreshed", extra={"error": repr(exc)})

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
        """Publish one batch of pending events; returns how many were confirmed. Raises
        OutboxPublishError (after recording it) when any event of the batch was not confirmed."""
        table: Table = self.model.__table__  # type: ignore[attr-defined]
        c = table.c
        async with self.sessions() as session:
            rows = (
                await session.execute(
                    select(c.id, c.message_id, c.routing_key, c.payload, c.correlation_id)
                    .where(c.published_at.is_(None))
                    .order_by(c.id)
                    .limit(self.batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            if not rows:
                return 0
            errors: dict[int, BaseException] = {}
            ids: list[int] = []
            outgoing: list[Outgoing] = []
            for row_id, message_id, routing_key, payload, correlation_id in rows:
                try:
                    message = MESSAGE_BY_ROUTING_KEY[routing_key].FromString(payload)
                except Exception as exc:  # an unknown routing key, an undecodable payload: not sent
                    errors[row_id] = exc
                    continue
                ids.append(row_id)
                outgoing.append(Outgoing(routing_key, message, message_id, correlation_id))
            results = await self.broker.publish_many(outgoing)
            confirmed: list[int] = []
            for row_id, result in zip(ids, results, strict=True):
                if result is None:
                    confirmed.append(row_id)
                else:
                    errors[row_id] = result
            if len(confirmed) > SMALL_UPDATE:
                await session.execute(
                    update(table).where(c.id.in_(confirmed)).values(published_at=utcnow(), attempts=c.attempts + 1)
                )
            elif confirmed:  # a few rows: one cached statement per row beats rendering an IN list
                now = utcnow()
                await session.execute(
                    update(table)
                    .where(c.id == bindparam("row_id"))
                    .values(published_at=bindparam("now"), attempts=c.attempts + 1),
                    [{"row_id": row_id, "now": now} for row_id in confirmed],
                )
            by_error: dict[str, list[int]] = {}
            for row_id, exc in errors.items():
                by_error.setdefault(repr(exc)[:1000], []).append(row_id)
            for text, failed in by_error.items():
                await session.execute(
                    update(table).where(c.id.in_(failed)).values(last_error=text, attempts=c.attempts + 1)
                )
            await session.commit()
        if errors:
            first = errors[min(errors)]
            raise OutboxPublishError(len(confirmed), len(errors), first) from first
        return len(confirmed)

    async def run(self, stop: asyncio.Event | None = None) -> None:
        gauge = asyncio.create_task(self._keep_backlog_gauge_fresh(), name=f"outbox-gauge-{self.service}")
        try:
            await self._run(stop or asyncio.Event())
        finally:
            gauge.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await gauge

    async def _run(self, stop: asyncio.Event) -> None:
        backoff = self.idle_seconds
        while not stop.is_set():
            # Clear before the work, not after: a notify() that arrives while run_once() runs (its
            # events may have committed after our SELECT) must wake the next round immediately.
            self._wake.clear()
            try:
                sent = await self.run_once()
                await self._refresh_backlog_gauge(idle=sent == 0)
                backoff = self.idle_seconds
                if sent >= self.batch_size:
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if isinstance(exc, OutboxPublishError) and exc.sent:
                    # the broker takes events: retry the others next round, without back-off
                    log.warning("outbox relay: events not confirmed, retrying", extra={"error": repr(exc)})
                    backoff = self.idle_seconds
                    if exc.sent + exc.failed >= self.batch_size:
                        continue
                else:
                    log.warning("outbox relay cannot publish yet", extra={"error": repr(exc), "retry_in_s": backoff})
                    backoff = min(backoff * 2, self.max_backoff_seconds)
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            except TimeoutError:
                pass
