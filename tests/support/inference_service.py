"""Helpers for the inference service tests: stored DICOM + image.received events, running the
service in-process against the real RabbitMQ node, and collecting what it publishes."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika

from harness.queues import routing_key_is, take
from services.core.broker import Broker
from services.core.contracts import ImageReceived, Prediction
from services.core.net import free_port
from services.inference.app import InferenceService
from services.inference.config import InferenceSettings
from services.inference.runtime import InferenceRuntime

SHARED_DICOM = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "dicom"


def shared_dicoms(shared_data: Path) -> list[Path]:
    return sorted((shared_data / "dicom").glob("*.dcm"))


def image_received(
    path: Path, sop_instance_uid: str, eligible: bool = True, sha256: str | None = None
) -> ImageReceived:
    event = ImageReceived(triage_eligible=eligible, modality="DX", view_position="PA", body_part_examined="CHEST")
    event.image.study_instance_uid = "1.2.826.0.1.3680043.8.498.1"
    event.image.series_instance_uid = "1.2.826.0.1.3680043.8.498.2"
    event.image.sop_instance_uid = sop_instance_uid
    event.image.storage_uri = path.resolve().as_uri()
    event.image.sha256 = sha256 if sha256 is not None else hashlib.sha256(path.read_bytes()).hexdigest()
    event.received_at.GetCurrentTime()
    if not eligible:
        event.not_triaged_reason = "view position LL is not triaged"
    return event


def store_copies(sources: list[Path], store: Path) -> list[Path]:
    store.mkdir(parents=True, exist_ok=True)
    out = []
    for src in sources:
        dst = store / src.name
        shutil.copy2(src, dst)
        out.append(dst)
    return out


def uid_for(i: int) -> str:
    return f"1.2.826.0.1.3680043.8.498.3.{i}"


async def publish_events(broker: Broker, events: list[ImageReceived]) -> None:
    for event in events:
        uid = event.image.sop_instance_uid
        await broker.publish("image.received", event, message_id=f"ingest:{uid}", correlation_id=uid)


async def collect_predictions(
    broker: Broker, count: int, timeout: float = 60.0, settle: float = 0.0
) -> list[tuple[Prediction, aio_pika.abc.AbstractIncomingMessage]]:
    """Take prediction.made messages from aggregator.events until `count` arrived (with `settle`:
    until no more came for that long, so extra ones are caught); other events on that queue are
    taken and ignored (harness.queues.take)."""
    assert broker.connection is not None
    messages = await take(
        broker.connection, "aggregator.events", count, timeout, settle, routing_key_is("prediction.made")
    )
    return [(Prediction.FromString(message.body), message) for message in messages]


async def dead_letters(broker: Broker, queue_name: str = "inference.images.dlq") -> list[tuple[str, str]]:
    """(sop_instance_uid, x-death-reason) of every message in the DLQ (taken = removed)."""
    assert broker.connection is not None
    return [
        (ImageReceived.FromString(m.body).image.sop_instance_uid, str((m.headers or {}).get("x-death-reason", "")))
        for m in await take(broker.connection, queue_name)
    ]


def service_settings(amqp_url: str, tmp: Path, repository: Path, **overrides: object) -> InferenceSettings:
    values: dict[str, object] = {
        "amqp_url": amqp_url,
        "data_dir": tmp / "var",
        "model_repository": repository,
        "http_port": free_port(),
        "ort_threads": 1,
        "max_wait_ms": 10.0,
        "retry_max_backoff_s": 1.0,
        "log_json": False,
    }
    values.update(overrides)
    return InferenceSettings(**values)


@contextlib.asynccontextmanager
async def running_service(
    settings: InferenceSettings, runtime: InferenceRuntime | None = None
) -> AsyncIterator[InferenceService]:
    service = InferenceService(settings, runtime)
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    started = asyncio.create_task(service.started.wait())
    done, _ = await asyncio.wait({task, started}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
    if task in done:
        started.cancel()
        task.result()  # raises what went wrong
        raise RuntimeError("inference service stopped during start-up")
    if started not in done:
        started.cancel()
        stop.set()
        await asyncio.gather(task, return_exceptions=True)
        raise TimeoutError("inference service did not start in 60 s")
    try:
        yield service
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
