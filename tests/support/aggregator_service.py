"""Fixtures for the aggregator's tests (import `aggregator_fixture`, `triage_tap_fixture`: the
fixtures are named "aggregator" and "triage_tap"): an in-process Aggregator on a real RabbitMQ node
(consumer + outbox relay) with its own SQLite file, one offline (no broker), and a queue that collects
the triage.updated events it publishes. The event builders and the fixed test policy live in
harness/aggregator_events.py (the benchmarks use them too); they are re-exported here for the tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aio_pika
import pytest

from harness.aggregator_events import (
    TEST_POLICY,
    apply_events,
    judgment,
    message_id,
    prediction,
    publish,
    received,
    ref,
    rejected,
    write_test_policy,
)
from harness.rabbitmq import RabbitNode
from services.aggregator.config import AggregatorSettings
from services.aggregator.service import Aggregator
from services.core.broker import Broker
from services.core.contracts import TriageUpdated

__all__ = [
    "TEST_POLICY",
    "TriageTap",
    "aggregator_fixture",
    "apply_events",
    "judgment",
    "message_id",
    "offline_aggregator_fixture",
    "prediction",
    "publish",
    "received",
    "ref",
    "rejected",
    "triage_tap_fixture",
    "write_test_policy",
]


class TriageTap:
    """An exclusive queue bound to triage.updated: what downstream subscribers would receive."""

    def __init__(self) -> None:
        self.events: list[TriageUpdated] = []
        self._conn: aio_pika.abc.AbstractRobustConnection | None = None

    async def start(self, url: str) -> TriageTap:
        self._conn = await aio_pika.connect_robust(url)
        channel = await self._conn.channel()
        exchange = await channel.declare_exchange("triage", aio_pika.ExchangeType.TOPIC, durable=True)
        queue = await channel.declare_queue("", exclusive=True)
        await queue.bind(exchange, "triage.updated")

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                self.events.append(TriageUpdated.FromString(message.body))

        await queue.consume(on_message)
        return self

    def for_study(self, study: str) -> list[TriageUpdated]:
        return [e for e in self.events if e.study_instance_uid == study]

    async def close(self) -> None:
        if self._conn is not None:
            await self._conn.close()


@pytest.fixture(name="aggregator")
async def aggregator_fixture(rabbit: RabbitNode, broker: Broker, tmp_path: Path) -> AsyncIterator[Aggregator]:
    """A running aggregator (consumer + relay) on the session's RabbitMQ, fresh DB, test policy."""
    settings = AggregatorSettings(
        data_dir=tmp_path,
        amqp_url=rabbit.url,
        policy_file=write_test_policy(tmp_path / "policy.yaml"),
        secret_key="test-secret",
    )
    agg = Aggregator(settings)
    await agg.migrate()
    await agg.broker.connect()
    await agg.consume()
    stop = asyncio.Event()
    relay = asyncio.create_task(agg.relay.run(stop))
    try:
        yield agg
    finally:
        stop.set()
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
        await agg.broker.close()
        await agg.engine.dispose()


@pytest.fixture(name="triage_tap")
async def triage_tap_fixture(rabbit: RabbitNode) -> AsyncIterator[TriageTap]:
    tap = await TriageTap().start(rabbit.url)
    try:
        yield tap
    finally:
        await tap.close()


@pytest.fixture(name="offline_aggregator")
async def offline_aggregator_fixture(tmp_path: Path, request: pytest.FixtureRequest) -> AsyncIterator[Aggregator]:
    """An Aggregator with its own DB and the test policy, not connected to a broker. Parametrize
    indirectly with a dict of extra settings (e.g. sr_destination)."""
    extra = getattr(request, "param", None) or {}
    settings = AggregatorSettings(
        data_dir=tmp_path,
        policy_file=write_test_policy(tmp_path / "policy.yaml"),
        secret_key="test-secret",
        **extra,
    )
    agg = Aggregator(settings)
    await agg.migrate()
    try:
        yield agg
    finally:
        await agg.engine.dispose()
