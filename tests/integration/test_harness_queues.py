"""The suite's one queue reader (harness/queues.py) against the real RabbitMQ node: take stops at
`count` (the rest stays), takes everything without it, peeks without removing, and `settle` catches a
message that arrives after `count` was reached."""

from __future__ import annotations

import asyncio

from harness.queues import payload, routing_key_is, take, wait_depths
from harness.rabbitmq import RabbitNode
from services.core.broker import Broker
from services.core.contracts import ImageReceived, ImageRef

QUEUE = "inference.images"


async def _publish(broker: Broker, *uids: str) -> None:
    for uid in uids:
        event = ImageReceived(image=ImageRef(sop_instance_uid=uid, sha256="ab" * 32))
        await broker.publish("image.received", event, message_id=f"harness:{uid}")


async def test_take_count_peek_and_rest(broker: Broker, rabbit: RabbitNode) -> None:
    assert broker.connection is not None
    await _publish(broker, "7.1", "7.2", "7.3")
    await wait_depths(rabbit, {QUEUE: 3})
    peeked = await take(broker.connection, QUEUE, remove=False)
    assert [payload(m).image.sop_instance_uid for m in peeked] == ["7.1", "7.2", "7.3"]
    await wait_depths(rabbit, {QUEUE: 3})  # a peek puts everything back
    first = await take(rabbit.url, QUEUE, count=2, keep=routing_key_is("image.received"))
    assert [payload(m).image.sop_instance_uid for m in first] == ["7.1", "7.2"]
    rest = await take(broker.connection, QUEUE)
    assert [payload(m).image.sop_instance_uid for m in rest] == ["7.3"]
    assert await take(broker.connection, QUEUE) == []
    await wait_depths(rabbit, {QUEUE: 0})


async def test_settle_catches_a_late_extra_message(broker: Broker) -> None:
    assert broker.connection is not None
    await _publish(broker, "8.1")

    async def late() -> None:
        await asyncio.sleep(0.3)  # the extra message arrives after `count` was reached (what is tested)
        await _publish(broker, "8.2")

    sender = asyncio.create_task(late())
    got = await take(broker.connection, QUEUE, count=1, timeout=10, settle=3.0)
    await sender
    assert [payload(m).image.sop_instance_uid for m in got] == ["8.1", "8.2"]
