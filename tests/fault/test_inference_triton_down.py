"""Triton killed (kill -9) in the middle of a run: the inference service keeps the messages unacked,
retries in-process with back-off, reports itself degraded, and predicts every image once Triton is
back — none lost, none dead-lettered, nothing bounced through the broker's retry queues."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from prometheus_client import REGISTRY

from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.core.broker import Broker
from services.inference.tools.local_triton import LocalTriton
from tests.support.inference_service import (
    collect_predictions,
    dead_letters,
    image_received,
    publish_events,
    running_service,
    service_settings,
    shared_dicoms,
    store_copies,
    uid_for,
)
from tests.support.triton import private_triton_fixture  # noqa: F401

pytestmark = pytest.mark.triton


async def test_triton_killed_mid_run_loses_nothing(
    broker: Broker, rabbit: RabbitNode, private_triton: LocalTriton, shared_data: Path, tmp_path: Path
) -> None:
    files = store_copies(shared_dicoms(shared_data), tmp_path / "store")
    events = [image_received(files[i % len(files)], uid_for(700 + i)) for i in range(36)]
    first, second, third = events[:12], events[12:24], events[24:]
    settings = service_settings(
        rabbit.url,
        tmp_path,
        private_triton.model_repository,
        triton_url=private_triton.grpc_url,
        max_batch=4,
        prefetch=8,
        heatmaps=False,
    )
    unavailable_before = REGISTRY.get_sample_value("pt_inference_errors_total", {"kind": "runtime_unavailable"}) or 0
    async with running_service(settings) as service:
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=10)
        await publish_events(broker, first)
        got = await collect_predictions(broker, len(first), timeout=60)
        assert len(got) == len(first)

        # kill -9 while the next images are being consumed and predicted
        def published() -> float:
            return (
                REGISTRY.get_sample_value("pt_broker_messages_published_total", {"routing_key": "image.received"}) or 0
            )

        before = published()
        publishing = asyncio.create_task(publish_events(broker, second))
        # the next images are arriving (the first of them is published): kill now
        await eventually_async(lambda: published() > before, 10, 0.01, what="the first of the next images published")
        await asyncio.to_thread(private_triton.kill)
        await publishing
        await publish_events(broker, third)
        during = await collect_predictions(broker, len(second) + len(third), timeout=4)
        health = await http.get("/healthz")
        assert health.status_code == 503
        assert health.json()["checks"]["runtime"]["ok"] is False
        depths = rabbit.queue_depths()
        # nothing was given up on: what is not predicted is either unacked here or still queued
        assert depths["inference.images.dlq"] == 0
        assert all(depths[q] == 0 for q in depths if q.startswith("inference.images.retry"))

        await asyncio.to_thread(private_triton.start)
        after = await collect_predictions(broker, len(second) + len(third) - len(during), timeout=90, settle=1.0)
        health = await http.get("/healthz")
        await http.aclose()
        assert health.status_code == 200, health.text
        assert service.pipeline.batcher.available

    predicted = [p.image.sop_instance_uid for p, _ in got + during + after]
    assert sorted(set(predicted)) == sorted(e.image.sop_instance_uid for e in events)
    assert len(predicted) == len(events), "an image was predicted twice"
    assert {p.runtime for p, _ in got + during + after} == {"triton"}
    assert await dead_letters(broker) == []
    unavailable = REGISTRY.get_sample_value("pt_inference_errors_total", {"kind": "runtime_unavailable"}) or 0
    assert unavailable > unavailable_before
    depths = rabbit.queue_depths()
    assert depths["inference.images"] == 0
