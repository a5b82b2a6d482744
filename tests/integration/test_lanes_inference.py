"""Lanes in the inference service (issue 24) on a real RabbitMQ node: a fresh image published while a
backfill backlog drains is predicted ahead of the backlog still queued (broker LaneGate + the
micro-batcher's fresh-first queue), its prediction travels on the fresh routing key and the backlog's
on `prediction.made.backfill`, and the backlog is still drained in full."""

from __future__ import annotations

import time
from datetime import UTC
from pathlib import Path

import pytest

from harness.queues import routing_key_is, take
from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.core.broker import Broker
from services.core.contracts import Prediction
from services.core.lanes import BACKFILL
from tests.support.inference_service import (
    image_received,
    publish_events,
    running_service,
    service_settings,
    shared_dicoms,
    store_copies,
    uid_for,
)
from tests.support.triton import inference_repository_fixture  # noqa: F401

BACKLOG = 300
# The backlog runs through the committed model on one onnxruntime thread: the drain's wait scales with
# the model's cost per image (an ensemble is ~10x the single network's), so it has room for a slow model
# on a busy 2-core machine. A wait, not a figure under test: the test checks the order.
DRAIN_TIMEOUT_S = 360


async def _predicted(broker: Broker) -> int:
    """Backfill predictions published so far: aggregator.events.backfill also holds the backlog's own
    image.received events (nothing consumes that queue here)."""
    return await _depth(broker, "aggregator.events.backfill") - BACKLOG


async def _depth(broker: Broker, queue: str) -> int:
    assert broker.connection is not None
    channel = await broker.connection.channel()
    try:
        declared = await channel.declare_queue(queue, passive=True)
        return int(declared.declaration_result.message_count or 0)
    finally:
        await channel.close()


@pytest.mark.timeout(600)
async def test_a_fresh_image_is_predicted_ahead_of_a_queued_backlog(
    broker: Broker, rabbit: RabbitNode, shared_data: Path, tmp_path: Path, inference_repository: Path
) -> None:
    files = store_copies(shared_dicoms(shared_data), tmp_path / "store")
    backlog = [image_received(files[i % len(files)], uid_for(24_000 + i)) for i in range(BACKLOG)]
    for event in backlog:
        event.image.lane = BACKFILL
    await publish_events(broker, backlog)
    fresh = image_received(files[0], uid_for(24_999))
    settings = service_settings(rabbit.url, tmp_path, inference_repository, prefetch=4, max_batch=4, heatmaps=False)
    async with running_service(settings):
        await eventually_async(lambda: _predicted(broker), 60, 0.02, what="the backlog started draining")
        published_at = time.time()
        await publish_events(broker, [fresh])
        assert broker.connection is not None
        keep = routing_key_is("prediction.made")
        got = await take(broker.connection, "aggregator.events", 1, timeout=60, keep=keep)
        keep = routing_key_is("prediction.made.backfill")
        rest = await take(broker.connection, "aggregator.events.backfill", BACKLOG, timeout=DRAIN_TIMEOUT_S, keep=keep)
    prediction = Prediction.FromString(got[0].body)
    assert prediction.image.sop_instance_uid == fresh.image.sop_instance_uid
    assert got[0].routing_key == "prediction.made"
    done_at = prediction.predicted_at.ToDatetime(tzinfo=UTC).timestamp()
    others = [Prediction.FromString(m.body) for m in rest]
    finished = [p.predicted_at.ToDatetime(tzinfo=UTC).timestamp() for p in others]
    # while it waited only the backfill work already in flight went on (4 slots, batches of 4, and
    # what the other slots finish while it is decoded): a first-in first-out queue would put the
    # whole remaining backlog (> 100) ahead of it
    ahead = sum(1 for t in finished if published_at <= t <= done_at)
    behind = sum(1 for t in finished if t > done_at)
    assert ahead <= 24, (ahead, behind)
    assert behind >= 100, (ahead, behind)  # a real backlog was still queued behind it
    assert {m.routing_key for m in rest} == {"prediction.made.backfill"}
    assert {p.image.sop_instance_uid for p in others} == {e.image.sop_instance_uid for e in backlog}
