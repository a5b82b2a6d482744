"""Fixtures for the ingest tests: the service running in the test's event loop, `pneumotriage ingest` as a
process (IngestProcess), and queue readers."""

from __future__ import annotations

import asyncio
import signal
import subprocess
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from harness.processes import CLI, TestProcess
from harness.queues import payload, take
from harness.rabbitmq import RabbitNode
from services.core.broker import Broker
from services.core.lanes import SUFFIX
from services.core.net import free_port
from services.ingest.app import IngestService
from services.ingest.config import IngestSettings

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
    """Take messages off a queue until `expected` arrived and nothing more came for `settle` seconds
    (harness.queues.take), each with its decoded payload."""
    messages = await take(rabbit_url, queue, count=expected, timeout=timeout, settle=settle)
    return [(message, payload(message)) for message in messages]


async def drain_lanes(
    rabbit_url: str, queue: str, expected: int, timeout: float = 60.0, settle: float = 1.0
) -> list[tuple[aio_pika.abc.AbstractIncomingMessage, Any]]:
    """`drain` over both lanes of a consumer, `queue` (fresh) and `queue`.backfill: real files from
    other toolkits carry old study dates, which ingest classes as backfill (services/ingest/lane_rules.py)."""
    queues = (queue, queue + SUFFIX)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    got: list[aio_pika.abc.AbstractIncomingMessage] = []
    while len(got) < expected and loop.time() < deadline:
        for name in queues:
            got += await take(rabbit_url, name, timeout=1.0)
        if len(got) < expected:
            await asyncio.sleep(0.1)  # the poll interval while the relay publishes
    for name in queues:  # and nothing more comes
        got += await take(rabbit_url, name, timeout=settle + 1.0, settle=settle)
    return [(message, payload(message)) for message in got]


def sop_uids(events: Iterable[tuple[Any, Any]]) -> list[str]:
    return [payload.image.sop_instance_uid for _, payload in events]


class IngestProcess:
    def __init__(self, data_dir: Path, amqp_url: str, **env: str) -> None:
        self.dicom_port, self.http_port = free_port(), free_port()
        self.log = data_dir / "ingest.log"
        self.env = {
            "PT_DATA_DIR": str(data_dir),
            "PT_AMQP_URL": amqp_url,
            "PT_INGEST_PORT": str(self.dicom_port),
            "PT_INGEST_HOST": "127.0.0.1",
            "PT_INGEST_HTTP_PORT": str(self.http_port),
            "PT_INGEST_AE_TITLE": AE_TITLE,
            **env,
        }
        self.process = TestProcess("ingest", [*CLI, "ingest"], self.log, env=self.env)

    async def start(self) -> IngestProcess:
        await asyncio.to_thread(self.process.start)
        await asyncio.to_thread(self.process.wait_listening, self.dicom_port, 120)
        await asyncio.to_thread(self.process.wait_listening, self.http_port, 60)
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        """`sig` to the service process alone (as a user's kill); its exit code."""
        self.process.signal(sig)
        return self.process.wait(timeout)
