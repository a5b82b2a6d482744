"""The DB kernel on SQLite and a real PostgreSQL: per-service Alembic history and the
transactional outbox publishing through a real RabbitMQ node, across a broker outage."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aio_pika.abc import AbstractIncomingMessage
from sqlalchemy import Row, String, func, inspect, select, update
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from harness.queues import take
from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.core.broker import Broker
from services.core.contracts import ImageReceived, ImageRef
from services.core.db import make_engine, make_sessionmaker
from services.core.db.base import make_base
from services.core.db.migrate import make_revision, upgrade
from services.core.db.outbox import OutboxMixin, OutboxPublishError, OutboxRelay, add_event
from tests.conftest import purge_all
from tests.support.postgres import postgres  # noqa: F401

Base = make_base("kerneltest")


class Thing(Base):
    __tablename__ = "kerneltest_things"
    id: Mapped[int] = mapped_column(primary_key=True)
    sop_uid: Mapped[str] = mapped_column(String(64), unique=True)


class Outbox(OutboxMixin, Base):
    __tablename__ = "kerneltest_outbox"


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def engine(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    if request.param == "sqlite":
        url = f"sqlite+aiosqlite:///{tmp_path}/k.db"
    else:
        url = request.getfixturevalue("postgres").url
    eng = make_engine(url)
    versions = tmp_path / "versions"
    versions.mkdir()
    await make_revision(eng, "kerneltest", Base.metadata, "initial", versions_dir=versions)
    await upgrade(eng, "kerneltest", Base.metadata, versions_dir=versions)
    await upgrade(eng, "kerneltest", Base.metadata, versions_dir=versions)  # idempotent
    try:
        yield eng
    finally:
        async with eng.begin() as conn:
            await conn.run_sync(Base.metadata.drop_all)
            await conn.exec_driver_sql("DROP TABLE IF EXISTS alembic_version_kerneltest")
        await eng.dispose()


async def test_migration_creates_prefixed_tables_and_own_version_table(engine: AsyncEngine) -> None:
    async with engine.connect() as conn:
        names = await conn.run_sync(lambda c: inspect(c).get_table_names())
    assert {"kerneltest_things", "kerneltest_outbox", "alembic_version_kerneltest"} <= set(names)


def _event(uid: str) -> ImageReceived:
    return ImageReceived(image=ImageRef(sop_instance_uid=uid, sha256="cd" * 32))


async def test_rolled_back_transaction_publishes_nothing(engine: AsyncEngine) -> None:
    sessions = make_sessionmaker(engine)
    async with sessions() as session:
        session.add(Thing(sop_uid="1.1"))
        add_event(session, Outbox, _event("1.1"), message_id="test:1.1")
        await session.rollback()
    async with sessions() as session:
        assert await session.scalar(select(func.count()).select_from(Outbox)) == 0


async def test_outbox_survives_broker_outage_without_loss_or_duplicates(
    engine: AsyncEngine, rabbit: RabbitNode
) -> None:
    sessions = make_sessionmaker(engine)
    broker = await Broker(rabbit.url).connect()
    await purge_all(broker)
    relay = OutboxRelay("kerneltest", sessions, Outbox, broker, batch_size=7)
    try:
        rabbit.stop_app()
        async with sessions() as session:
            for i in range(20):
                session.add(Thing(sop_uid=f"2.{i}"))
                add_event(session, Outbox, _event(f"2.{i}"), message_id=f"test:2.{i}", correlation_id=f"2.{i}")
            await session.commit()
        with pytest.raises(Exception):  # noqa: B017 - any connection error is the point
            await relay.run_once()
        assert await relay.backlog() == 20
        async with sessions() as session:
            errors = (await session.scalars(select(Outbox.last_error))).all()
        assert sum(1 for e in errors if e) == 7, "the failed attempt is recorded on the batch it tried"
    finally:
        rabbit.start_app()

    async def outbox_empty() -> bool:
        return await relay.backlog() == 0

    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    await eventually_async(outbox_empty, 20, what="the relay to publish the backlog")
    stop.set()
    relay.notify()
    await asyncio.wait_for(task, 10)
    assert await relay.backlog() == 0

    assert broker.connection is not None
    uids = [
        ImageReceived.FromString(m.body).image.sop_instance_uid
        for m in await take(broker.connection, "inference.images")
    ]
    assert sorted(uids) == sorted(f"2.{i}" for i in range(20))
    await broker.close()


async def test_notify_during_a_run_is_not_lost(engine: AsyncEngine, rabbit: RabbitNode) -> None:
    """A producer that commits and notifies while the relay is publishing an earlier batch is served
    by the next round at once, not after the idle poll (30 s here). The relay is held inside its
    publish for real: a RabbitMQ memory alarm blocks publishers until it is cleared."""
    sessions = make_sessionmaker(engine)
    broker = await Broker(rabbit.url).connect()
    await purge_all(broker)
    relay = OutboxRelay("kerneltest", sessions, Outbox, broker, idle_seconds=30.0)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))

    async def stage(uid: str) -> None:
        async with sessions() as session:
            session.add(Thing(sop_uid=uid))
            add_event(session, Outbox, _event(uid), message_id=f"test:{uid}")
            await session.commit()
        relay.notify()

    def connection_states() -> list[str]:
        return rabbit.ctl("list_connections", "state", "--no-table-headers").stdout.split()

    try:
        rabbit.ctl("set_vm_memory_high_watermark", "0")  # every publisher blocks from now on
        await stage("3.1")

        async def publishing_blocked() -> bool:  # the relay has selected 3.1 and is blocked publishing it
            return "blocked" in await asyncio.to_thread(connection_states)

        await eventually_async(publishing_blocked, 30, what="the relay blocked publishing 3.1")
        await stage("3.2")  # committed after the relay's SELECT, notified during its run
    finally:
        rabbit.ctl("set_vm_memory_high_watermark", "0.4")
    try:

        async def outbox_empty() -> bool:
            return await relay.backlog() == 0

        # 5 s, far below the 30 s poll: a lost notify would leave 3.2 there until the next poll
        await eventually_async(outbox_empty, 5, what="3.2 published at once (the notify during the run kept)")
    finally:
        stop.set()
        relay.notify()
        await asyncio.wait_for(task, 15)
        await broker.close()


async def _stage(sessions: async_sessionmaker[AsyncSession], prefix: str, n: int) -> list[str]:
    """Commit n events (in one transaction, row ids in this order); returns their SOP UIDs."""
    uids = [f"{prefix}.{i}" for i in range(n)]
    async with sessions() as session:
        for uid in uids:
            add_event(session, Outbox, _event(uid), message_id=f"test:{uid}", correlation_id=uid)
        await session.commit()
    return uids


async def _rows(sessions: async_sessionmaker[AsyncSession]) -> list[Row[Any]]:
    async with sessions() as session:
        result = await session.execute(
            select(Outbox.correlation_id, Outbox.published_at, Outbox.attempts, Outbox.last_error).order_by(Outbox.id)
        )
        return list(result.all())


def _uids(messages: list[AbstractIncomingMessage]) -> list[str]:
    return [ImageReceived.FromString(m.body).image.sop_instance_uid for m in messages]


async def test_batch_is_published_with_confirms_outstanding_together_in_row_order(
    engine: AsyncEngine, rabbit: RabbitNode
) -> None:
    """One round publishes its whole batch before any confirm comes back (a RabbitMQ memory alarm
    holds every confirm, for real), marks nothing until the confirms arrive, then marks every row;
    the queue holds each event once, in row id order."""
    sessions = make_sessionmaker(engine)
    broker = await Broker(rabbit.url).connect()
    await purge_all(broker)
    n = 60
    relay = OutboxRelay("kerneltest", sessions, Outbox, broker, batch_size=n)
    uids = await _stage(sessions, "4", n)
    try:
        rabbit.ctl("set_vm_memory_high_watermark", "0")  # the broker stops confirming (and reading)
        task = asyncio.create_task(relay.run_once())
        # The old relay awaited each confirm before the next publish: one in flight, never n.
        await eventually_async(
            lambda: broker.unconfirmed == n, 30, what=lambda: f"{broker.unconfirmed} in flight {task}"
        )
        assert await relay.backlog() == n, "nothing is marked before its confirm"
    finally:
        rabbit.ctl("set_vm_memory_high_watermark", "0.4")
    try:
        assert await asyncio.wait_for(task, 30) == n
        rows = await _rows(sessions)
        assert all(r.published_at is not None and r.attempts == 1 and r.last_error is None for r in rows)
        assert broker.unconfirmed == 0
        # a confirm means enqueued: the depth is final now, so this also shows there is no duplicate
        assert rabbit.queue_depths()["inference.images"] == n
        assert broker.connection is not None
        assert _uids(await take(broker.connection, "inference.images", count=n)) == uids
    finally:
        await broker.close()


async def test_events_not_confirmed_stay_pending_and_go_in_the_next_round(
    engine: AsyncEngine, rabbit: RabbitNode
) -> None:
    """The broker nacks part of a batch for real (a queue length limit with overflow=reject-publish)
    and one row cannot even be sent (a routing key no message has): exactly those rows keep
    published_at NULL, with their error and one attempt; the rest of the batch is marked. The next
    round delivers them; every event reaches the queue once."""
    vhost = f"pt-outbox-{uuid.uuid4().hex[:8]}"
    rabbit.ctl("add_vhost", vhost)
    rabbit.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    queues = "^(inference|labeling)\\.images$|^aggregator\\.events$"
    rabbit.ctl(
        "set_policy",
        "-p",
        vhost,
        "--apply-to",
        "queues",
        "cap",
        queues,
        '{"max-length": 5, "overflow": "reject-publish"}',
    )
    sessions = make_sessionmaker(engine)
    broker = await Broker(f"amqp://guest:guest@127.0.0.1:{rabbit.port}/{vhost}").connect()
    relay = OutboxRelay("kerneltest", sessions, Outbox, broker, batch_size=50)
    try:
        await _stage(sessions, "5", 12)
        async with sessions() as session:  # row 3 of 12: nothing can be published as "image.bogus"
            await session.execute(
                update(Outbox).where(Outbox.correlation_id == "5.2").values(routing_key="image.bogus")
            )
            await session.commit()
        with pytest.raises(OutboxPublishError) as raised:
            await relay.run_once()
        assert (raised.value.sent, raised.value.failed) == (5, 7)
        rows = {r.correlation_id: r for r in await _rows(sessions)}
        confirmed = ["5.0", "5.1", "5.3", "5.4", "5.5"]  # the first five the queues accepted
        for uid, row in rows.items():
            assert row.attempts == 1, uid
            if uid in confirmed:
                assert row.published_at is not None and row.last_error is None, uid
            else:
                assert row.published_at is None and row.last_error, uid
        assert "KeyError" in rows["5.2"].last_error and "DeliveryError" in rows["5.6"].last_error
        assert await relay.backlog() == 7

        assert broker.connection is not None
        assert _uids(await take(broker.connection, "inference.images", count=5)) == confirmed
        rabbit.ctl("clear_policy", "-p", vhost, "cap")  # the queues take everything again
        async with sessions() as session:  # and the bad row is repaired
            await session.execute(
                update(Outbox).where(Outbox.correlation_id == "5.2").values(routing_key="image.received")
            )
            await session.commit()
        assert await relay.run_once() == 7
        assert await relay.backlog() == 0
        assert {r.attempts for r in await _rows(sessions)} == {1, 2}
        # confirmed = enqueued: the depth is final, so none of the first five was sent again
        assert rabbit.queue_depths(vhost)["inference.images"] == 7
        retried = ["5.2", *(f"5.{i}" for i in range(6, 12))]
        assert _uids(await take(broker.connection, "inference.images", count=7)) == retried
    finally:
        await broker.close()
        rabbit.ctl("delete_vhost", vhost, check=False)


async def test_broker_lost_mid_batch_marks_nothing_unconfirmed(engine: AsyncEngine, rabbit: RabbitNode) -> None:
    """The broker goes down while a whole batch waits for its confirms (held by a memory alarm):
    no row is marked, each records the error, and once the broker is back every event reaches the
    queue (at least once). The second round uses a new connection: aio-pika's robust connection
    does not come back after a blocked connection was closed (a single publish shows it too)."""
    sessions = make_sessionmaker(engine)
    broker = await Broker(rabbit.url).connect()
    await purge_all(broker)
    n = 30
    relay = OutboxRelay("kerneltest", sessions, Outbox, broker, batch_size=n)
    uids = await _stage(sessions, "6", n)
    try:
        rabbit.ctl("set_vm_memory_high_watermark", "0")
        task = asyncio.create_task(relay.run_once())
        await eventually_async(
            lambda: broker.unconfirmed == n, 30, what=lambda: f"{broker.unconfirmed} in flight {task}"
        )
        rabbit.stop_app()
        with pytest.raises(OutboxPublishError) as raised:
            await asyncio.wait_for(task, 30)
        assert (raised.value.sent, raised.value.failed) == (0, n)
        rows = await _rows(sessions)
        assert all(r.published_at is None and r.attempts == 1 and r.last_error for r in rows)
    finally:
        rabbit.start_app()
        rabbit.ctl("set_vm_memory_high_watermark", "0.4")
        await asyncio.wait_for(broker.close(), 30)
    broker = await Broker(rabbit.url).connect()
    try:
        relay.broker = broker
        assert await relay.run_once() == n
        assert await relay.backlog() == 0
        assert broker.connection is not None
        got = _uids(await take(broker.connection, "inference.images"))
        assert set(got) == set(uids), "no event lost"
    finally:
        await broker.close()


async def test_backlog_gauge_is_not_a_query_per_round(engine: AsyncEngine, rabbit: RabbitNode) -> None:
    """Events arriving one at a time make one relay round each; the pt_outbox_backlog gauge is read
    from the table at most once a second meanwhile (it was a COUNT query after every round), and
    an idle round brings it up to date."""
    import time

    from prometheus_client import REGISTRY

    sessions = make_sessionmaker(engine)
    broker = await Broker(rabbit.url).connect()
    await purge_all(broker)
    relay = OutboxRelay("kerneltest-gauge", sessions, Outbox, broker, idle_seconds=30)
    reads = 0
    count_backlog = relay.backlog

    async def counted() -> int:
        nonlocal reads
        reads += 1
        return await count_backlog()

    relay.backlog = counted  # type: ignore[method-assign]
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:
        await eventually_async(lambda: reads == 1, 10, what="the relay's first (idle) round")
        started = time.monotonic()
        for i in range(20):
            async with sessions() as session:
                add_event(session, Outbox, _event(f"8.{i}"), message_id=f"test:8.{i}")
                await session.commit()
            relay.notify()

            async def published(i: int = i) -> bool:
                async with sessions() as session:
                    row = await session.scalar(select(Outbox.published_at).where(Outbox.message_id == f"test:8.{i}"))
                return row is not None

            await eventually_async(published, 10, what=f"event {i} published")
        elapsed = time.monotonic() - started
        assert reads - 1 <= 1 + elapsed / 1.0, (reads, elapsed)  # 20 rounds; before: 20 reads
        relay.notify()  # nothing pending: an idle round reads the gauge again
        await eventually_async(lambda: reads >= 2, 10, what="an idle round's read")
        assert REGISTRY.get_sample_value("pt_outbox_backlog", {"service": "kerneltest-gauge"}) == 0
    finally:
        stop.set()
        relay.notify()
        await asyncio.wait_for(task, 10)
        await broker.close()
