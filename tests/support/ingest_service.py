"""Fixtures for the ingest tests: the service running in the test's event loop, and queue readers."""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from services.core.broker import Broker
from services.core.contracts import MESSAGE_BY_ROUTING_KEY
from services.core.net import free_port
from services.ingest.app import IngestService
from services.ingest.config import IngestSettings
from services.system.rabbitmq import RabbitNode

AE_TITLE = "PNEUMOTRIAGE"


def ingest_settings(tmp_path: Path, rabbit_url: str, **overrides: Any) -> IngestSettings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "var",
        "amqp_url": rabbit_url,
        "ae_title": AE_TITLE,
        "host": "127.0.0.1",
        "port": 0,  # an ephemeral port, read back from the running server
        "http_port": free_port(),
        "log_json": True,
    }
    values.update(overrides)
    return IngestSettings(**values)


@pytest.fixture(name="ingest_service")
async def ingest_service_fixture(tmp_path: Path, rabbit: RabbitNode, broker: Broker) -> AsyncIterator[IngestService]:
    """The ingest service (SCP + relay + HTTP) in this event loop, with its own data dir; queues purged."""
    service = await IngestService(ingest_settings(tmp_path, rabbit.url)).start()
    try:
        yield service
    finally:
        await service.stop()


async def run(cmd: list[str], timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run a peer tool without blocking the loop the in-process SCP needs."""
    return await asyncio.to_thread(subprocess.run, cmd, capture_output=True, text=True, timeout=timeout)


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await asyncio.to_thread(fn, *args, **kwargs)


async def drain(
    rabbit_url: str, queue: str, expected: int, timeout: float = 60.0, settle: float = 1.0
) -> list[tuple[aio_pika.abc.AbstractIncomingMessage, Any]]:
    """Take messages off a queue until `expected` arrived and nothing more came for `settle` seconds."""
    connection = await aio_pika.connect(rabbit_url)
    got: list[tuple[aio_pika.abc.AbstractIncomingMessage, Any]] = []
    try:
        channel = await connection.channel()
        q = await channel.get_queue(queue)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        quiet_since = loop.time()
        while loop.time() < deadline:
            msg = await q.get(no_ack=True, fail=False)
            if msg is None:
                if len(got) >= expected and loop.time() - quiet_since >= settle:
                    break
                await asyncio.sleep(0.1)
                continue
            quiet_since = loop.time()
            key = msg.headers.get("x-original-routing-key") or msg.routing_key
            got.append((msg, MESSAGE_BY_ROUTING_KEY[str(key)].FromString(msg.body)))
    finally:
        await connection.close()
    return got


def sop_uids(events: Iterable[tuple[Any, Any]]) -> list[str]:
    return [payload.image.sop_instance_uid for _, payload in events]
