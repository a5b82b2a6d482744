"""pt_outbox_backlog counts the events waiting while a RabbitMQ memory alarm blocks publishing
(issue 22, item 10): it stayed 0 for the whole alarm, because the gauge was refreshed only after a
relay round that returned normally, and a blocked round only ends in a confirm timeout. The
runbook's alert on it (deploy/prometheus) could never fire.

Everything is real: the alarm (`set_vm_memory_high_watermark 0`), the blocked connection, the
outbox table (SQLite), the gauge in the process's Prometheus registry."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from sqlalchemy.ext.asyncio import AsyncEngine

from harness.queues import take
from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.core.broker import Broker
from services.core.contracts import ImageReceived, ImageRef
from services.core.db import make_engine, make_sessionmaker
from services.core.db.base import make_base
from services.core.db.outbox import OutboxMixin, OutboxRelay, add_event
from tests.conftest import purge_all

SERVICE = "alarmtest"
Base = make_base(SERVICE)


class Outbox(OutboxMixin, Base):
    __tablename__ = "alarmtest_outbox"


@pytest.fixture
async def engine(tmp_path: Path) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(f"sqlite+aiosqlite:///{tmp_path}/alarm.db")
    async with eng.begin() as conn:
        await conn.run_sync(Base.metadata.create_all)
    try:
        yield eng
    finally:
        await eng.dispose()


def gauge() -> float | None:
    return REGISTRY.get_sample_value("pt_outbox_backlog", {"service": SERVICE})


async def test_backlog_gauge_counts_events_held_by_a_memory_alarm(engine: AsyncEngine, rabbit: RabbitNode) -> None:
    sessions = make_sessionmaker(engine)
    broker = await Broker(rabbit.url).connect()
    await purge_all(broker)
    relay = OutboxRelay(SERVICE, sessions, Outbox, broker)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    n = 5

    def connection_states() -> list[str]:
        return rabbit.ctl("list_connections", "state", "--no-table-headers").stdout.split()

    try:
        await eventually_async(lambda: gauge() == 0, 10, what="the relay's first round sets the gauge")
        rabbit.ctl("set_vm_memory_high_watermark", "0")  # every publishing connection blocks from now on
        try:
            async with sessions() as session:
                for i in range(n):
                    add_event(
                        session,
                        Outbox,
                        ImageReceived(image=ImageRef(sop_instance_uid=f"9.{i}", sha256="ef" * 32)),
                        message_id=f"alarm:9.{i}",
                    )
                await session.commit()
            relay.notify()

            async def is_blocked() -> bool:
                return "blocked" in await asyncio.to_thread(connection_states)

            await eventually_async(is_blocked, 30, what="our connection blocked by the alarm")
            # the relay's round is stuck on the blocked publish: the gauge must show what waits
            await eventually_async(lambda: gauge() == n, 30, what=lambda: f"pt_outbox_backlog = {n} (is {gauge()})")
            assert await relay.backlog() == n
        finally:
            rabbit.ctl("set_vm_memory_high_watermark", "0.4")
        # alarm over: everything is published once and the gauge comes back to 0
        got = await take(rabbit.url, "inference.images", count=n, timeout=60, settle=0.5)
        assert sorted(m.message_id for m in got) == [f"alarm:9.{i}" for i in range(n)]
        await eventually_async(lambda: gauge() == 0, 30, what=lambda: f"pt_outbox_backlog back to 0 (is {gauge()})")
    finally:
        stop.set()
        relay.notify()
        await asyncio.wait_for(task, 30)
        await purge_all(broker)
        await broker.close()
