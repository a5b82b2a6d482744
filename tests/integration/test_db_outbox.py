"""The DB kernel on SQLite and a real PostgreSQL: per-service Alembic history and the
transactional outbox publishing through a real RabbitMQ node, across a broker outage."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from sqlalchemy import String, func, inspect, select
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Mapped, mapped_column

from services.core.broker import Broker
from services.core.contracts import ImageReceived, ImageRef
from services.core.db import make_engine, make_sessionmaker
from services.core.db.base import make_base
from services.core.db.migrate import make_revision, upgrade
from services.core.db.outbox import OutboxMixin, OutboxRelay, add_event
from services.system.rabbitmq import RabbitNode
from tests.conftest import purge_all
from tests.support.postgres import postgres  # noqa: F401
from tests.support.queues import take
from tests.support.wait import eventually_async

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
