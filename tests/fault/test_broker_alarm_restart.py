"""RabbitMQ restarts while a memory alarm blocks our connection: publishing and consuming resume.

Without services/core/amqp_blocked_close.py the channels of that connection never come back
(aiormq leaves the dead connection "blocked", aio-pika's channel restore waits on it under a lock
the reconnect needs): publishes fail with ChannelInvalidStateError and consumers stop, for as long
as the process runs. Everything here is real: the alarm (`set_vm_memory_high_watermark 0`), the
blocked connection, the broker's restart.
"""

from __future__ import annotations

import asyncio
import contextlib

from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.core.broker import CONSUMERS, Broker, Envelope
from services.core.contracts import ImageReceived, ImageRef
from tests.conftest import purge_all


def _received(uid: str) -> ImageReceived:
    return ImageReceived(image=ImageRef(sop_instance_uid=uid, study_instance_uid="5", sha256="ab" * 32))


async def test_publish_and_consume_resume_after_a_restart_during_a_memory_alarm(rabbit: RabbitNode) -> None:
    broker = await Broker(rabbit.url).connect()
    await purge_all(broker)
    got: asyncio.Queue[str] = asyncio.Queue()

    async def handler(envelope: Envelope) -> None:
        assert isinstance(envelope.payload, ImageReceived)
        await got.put(envelope.payload.image.sop_instance_uid)

    await broker.consume(CONSUMERS["inference"], handler)
    await broker.publish("image.received", _received("5.0"), message_id="5.0")
    assert await asyncio.wait_for(got.get(), 10) == "5.0"

    def connection_states() -> list[str]:
        return rabbit.ctl("list_connections", "state", "--no-table-headers").stdout.split()

    blocked: asyncio.Task[None] | None = None
    try:
        rabbit.ctl("set_vm_memory_high_watermark", "0")  # every publishing connection blocks from now on
        blocked = asyncio.create_task(broker.publish("image.received", _received("5.1"), message_id="5.1"))

        async def is_blocked() -> bool:
            return "blocked" in await asyncio.to_thread(connection_states)

        await eventually_async(is_blocked, 30, what="our connection blocked by the alarm")
        await asyncio.to_thread(rabbit.stop_app)  # the broker goes down while it blocks us
    finally:
        await asyncio.to_thread(rabbit.start_app)
        rabbit.ctl("set_vm_memory_high_watermark", "0.4")
    try:
        # the publish that was blocked when the broker went down fails (the outbox retries it)
        assert blocked is not None
        with contextlib.suppress(Exception):
            await asyncio.wait_for(blocked, 15)
        assert blocked.done()

        async def publishes() -> bool:
            try:
                await broker.publish("image.received", _received("5.2"), message_id="5.2", timeout=2)
            except Exception:
                return False
            return True

        # aio-pika reconnects every 5 s: one or two attempts after the broker is back
        await eventually_async(publishes, 30, interval=0.5, what="a confirmed publish after the restart")
        seen: list[str] = []

        async def consumed() -> bool:
            while not got.empty():
                seen.append(got.get_nowait())
            return "5.2" in seen

        await eventually_async(consumed, 30, what=lambda: f"5.2 consumed again (seen {seen})")
    finally:
        await broker.close()
