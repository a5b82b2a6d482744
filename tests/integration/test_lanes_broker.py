"""Lanes on a real RabbitMQ node (issue 24): in both ways a stage consumes (`Broker.consume`: inference,
labeling; `Broker.consume_batch`: the aggregator) a fresh image published behind a queued backlog is
handled within one round of the handler slots, the backlog is still drained (not starved), and the
same holds on quorum queues (the cluster set-up), which have no message priorities."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import pytest

from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.core.broker import CONSUMERS, Broker, Envelope
from services.core.contracts import ImageReceived, ImageRef
from services.core.lanes import BACKFILL, FRESH

BACKLOG = 150
PREFETCH = 8


def _received(uid: str, lane: str) -> ImageReceived:
    return ImageReceived(image=ImageRef(sop_instance_uid=uid, study_instance_uid="1.2", sha256="ab" * 32, lane=lane))


@pytest.fixture(params=["classic", "quorum"])
async def lane_broker(request: pytest.FixtureRequest, rabbit: RabbitNode) -> AsyncIterator[tuple[str, bool]]:
    """A vhost of its own per test (classic or quorum queues cannot share a queue name)."""
    vhost = f"lanes-{uuid.uuid4().hex[:8]}"
    await asyncio.to_thread(rabbit.ctl, "add_vhost", vhost)
    await asyncio.to_thread(rabbit.ctl, "set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    try:
        yield f"{rabbit.url.rstrip('/')}/{vhost}", request.param == "quorum"
    finally:
        await asyncio.to_thread(rabbit.ctl, "delete_vhost", vhost, check=False)


async def _backlog_then_fresh(url: str, quorum: bool, start: object, order: list[str], after: int) -> tuple[int, int]:
    """Queue BACKLOG backfill events, start the consumer (`start(broker)`), publish one fresh event
    once `after` were handled; returns the fresh event's place in the handling order and how many
    had been handled when its publish was confirmed."""
    producer = await Broker(url, quorum=quorum).connect()
    consumer = await Broker(url, quorum=quorum).connect()
    try:
        for i in range(BACKLOG):
            await producer.publish("image.received", _received(f"b.{i}", BACKFILL), message_id=f"b{i}")
        await start(consumer)  # type: ignore[operator]
        await eventually_async(lambda: len(order) >= after, 30, what=lambda: f"handled {len(order)}")
        before = len(order)
        await producer.publish("image.received", _received("f.1", FRESH), message_id="f1")
        published = len(order)
        await eventually_async(lambda: len(order) == BACKLOG + 1, 60, what=lambda: f"handled {len(order)}")
        place = order.index("f.1")
        assert place >= before
        return place, published
    finally:
        await consumer.close()
        await producer.close()


async def test_consume_fresh_overtakes_a_queued_backlog(lane_broker: tuple[str, bool]) -> None:
    url, quorum = lane_broker
    order: list[str] = []

    async def handler(env: Envelope) -> None:
        await asyncio.sleep(0.02)  # the work a stage does per image (pacing, not synchronisation)
        order.append(env.payload.image.sop_instance_uid)  # type: ignore[attr-defined]
        assert env.lane == (FRESH if env.payload.image.sop_instance_uid == "f.1" else BACKFILL)  # type: ignore[attr-defined]

    async def start(b: Broker) -> None:
        await b.consume(CONSUMERS["inference"], handler, prefetch=PREFETCH)

    place, published = await _backlog_then_fresh(url, quorum, start, order, after=20)
    # at most the slots already taken by backfill when it arrived go first
    assert place <= published + PREFETCH, (place, published)
    assert sorted(order) == sorted([f"b.{i}" for i in range(BACKLOG)] + ["f.1"])  # the backlog drained too
    assert BACKLOG - place > 100  # it overtook a backlog that was still queued


async def test_consume_batch_fresh_overtakes_a_queued_backlog(lane_broker: tuple[str, bool]) -> None:
    url, quorum = lane_broker
    order: list[str] = []

    async def batch_handler(envs: list[Envelope]) -> None:
        await asyncio.sleep(0.02)  # one commit per batch (pacing, not synchronisation)
        lanes = {e.lane for e in envs}
        assert len(lanes) == 1  # a batch is of one lane (its own retry queues and DLQ)
        order.extend(e.payload.image.sop_instance_uid for e in envs)  # type: ignore[attr-defined]

    async def handler(env: Envelope) -> None:
        raise AssertionError("no batch fails here")

    async def start(b: Broker) -> None:
        await b.consume_batch(CONSUMERS["aggregator"], handler, batch_handler, prefetch=32, max_batch=8)

    place, published = await _backlog_then_fresh(url, quorum, start, order, after=16)
    assert place <= published + 8, (place, published)  # behind at most the batch being applied
    assert sorted(order) == sorted([f"b.{i}" for i in range(BACKLOG)] + ["f.1"])
    assert BACKLOG - place > 100


async def test_backfill_keeps_flowing_while_fresh_work_never_stops(lane_broker: tuple[str, bool]) -> None:
    """Fresh work all the time: one slot in burst + 1 still goes to the backlog."""
    url, quorum = lane_broker
    producer = await Broker(url, quorum=quorum).connect()
    consumer = await Broker(url, quorum=quorum).connect()
    handled = {FRESH: 0, BACKFILL: 0}
    try:
        for i in range(40):
            await producer.publish("image.received", _received(f"b.{i}", BACKFILL), message_id=f"b{i}")
        for i in range(400):
            await producer.publish("image.received", _received(f"f.{i}", FRESH), message_id=f"f{i}")

        async def handler(env: Envelope) -> None:
            await asyncio.sleep(0.002)  # pacing, not synchronisation
            handled[env.lane] += 1

        await consumer.consume(CONSUMERS["labeling"], handler, prefetch=4, burst=4)
        await eventually_async(lambda: handled[FRESH] >= 100, 60, what=lambda: str(handled))
        assert handled[BACKFILL] >= 10, handled  # fresh still queued, and backfill got its share
    finally:
        await consumer.close()
        await producer.close()
