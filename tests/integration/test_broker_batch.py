"""Broker.consume_batch on a real RabbitMQ node: a full queue is handed over in batches, in
delivery order; a batch that fails falls back to one message at a time, so a poison message is
dead-lettered with its reason and the others of its batch are still handled and acked."""

from __future__ import annotations

import asyncio

from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.core.broker import CONSUMERS, Broker, Envelope, PermanentError
from services.core.contracts import ImageReceived, ImageRef

SPEC = CONSUMERS["aggregator"]


def _received(uid: str) -> ImageReceived:
    return ImageReceived(image=ImageRef(sop_instance_uid=uid, study_instance_uid="1.2", sha256="ab" * 32))


async def test_batches_in_order_and_a_poison_message_only_fails_itself(broker: Broker, rabbit: RabbitNode) -> None:
    n = 60
    for i in range(n):
        await broker.publish("image.received", _received(f"1.2.{i}"), message_id=f"m{i}")
    batches: list[list[str]] = []
    singles: list[str] = []
    handled: list[str] = []

    async def batch_handler(envs: list[Envelope]) -> None:
        uids = [e.payload.image.sop_instance_uid for e in envs]  # type: ignore[attr-defined]
        batches.append(uids)
        if "1.2.33" in uids:
            raise PermanentError("poison in this batch")
        handled.extend(uids)

    async def handler(env: Envelope) -> None:
        uid = env.payload.image.sop_instance_uid  # type: ignore[attr-defined]
        singles.append(uid)
        if uid == "1.2.33":
            raise PermanentError("the poison message")
        handled.append(uid)

    consumer = await Broker(rabbit.url).connect()
    try:
        await consumer.consume_batch(SPEC, handler, batch_handler, prefetch=32, max_batch=16)

        async def settled() -> bool:
            depths = await asyncio.to_thread(rabbit.queue_depths)
            return len(handled) == n - 1 and depths.get(SPEC.queue, 1) == 0 and depths.get(SPEC.dlq, 0) == 1

        await eventually_async(settled, what="every message handled or dead-lettered")
    finally:
        await consumer.close()
    # a pre-filled queue is handed over in batches (never bigger than max_batch), in delivery order
    assert max(len(b) for b in batches) > 1 and all(len(b) <= 16 for b in batches)
    assert [u for b in batches for u in b] == [f"1.2.{i}" for i in range(n)]
    # the failed batch was retried one by one: only the poison message was dead-lettered
    poisoned = next(b for b in batches if "1.2.33" in b)
    assert singles == poisoned
    assert sorted(handled) == sorted(f"1.2.{i}" for i in range(n) if i != 33)
    depths = rabbit.queue_depths()
    assert depths[SPEC.dlq] == 1


async def _batches_of_a_trickle(broker: Broker, rabbit: RabbitNode, max_wait_s: float) -> list[int]:
    """12 messages published 10 ms apart (events trickling in, as from a busy pipeline)."""
    sizes: list[int] = []
    consumer = await Broker(rabbit.url).connect()
    try:

        async def batch_handler(envs: list[Envelope]) -> None:
            sizes.append(len(envs))

        async def handler(env: Envelope) -> None:
            raise AssertionError("no batch fails here")

        await consumer.consume_batch(SPEC, handler, batch_handler, prefetch=32, max_batch=8, max_wait_s=max_wait_s)
        await asyncio.sleep(0.2)  # the consumer is attached before the first message
        for i in range(12):
            await broker.publish("image.received", _received(f"1.3.{i}"), message_id=f"t{max_wait_s}-{i}")
            await asyncio.sleep(0.01)

        async def all_handled() -> bool:
            return sum(sizes) == 12

        await eventually_async(all_handled, what="the trickle handled")
    finally:
        await consumer.close()
    return sizes


async def test_a_batch_waits_for_company_only_when_asked(broker: Broker, rabbit: RabbitNode) -> None:
    """max_wait_s: the first message of a batch waits up to that long for more (fewer, larger
    transactions under load), never past max_batch; 0 takes only what has already arrived."""
    at_once = await _batches_of_a_trickle(broker, rabbit, 0.0)
    assert len(at_once) >= 6, at_once  # 10 ms apart: mostly one message per batch
    waited = await _batches_of_a_trickle(broker, rabbit, 0.5)
    assert waited == [8, 4], waited  # the first batch fills to max_batch; the rest waits out 0.5 s
