"""Fixtures for the aggregator's tests (import `aggregator_fixture`, `triage_tap_fixture`: the
fixtures are named "aggregator" and "triage_tap"): a fixed test policy, an in-process Aggregator on a real
RabbitMQ node (consumer + outbox relay) with its own SQLite file, event builders, and a queue that
collects the triage.updated events it publishes."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aio_pika
import pytest

from services.aggregator.config import AggregatorSettings
from services.aggregator.fusion import FusionWeights
from services.aggregator.policy import Policy, Thresholds
from services.aggregator.service import Aggregator
from services.core.broker import Broker
from services.core.contracts import (
    Answer,
    Confidence,
    ImageReceived,
    ImageRef,
    ImageRejected,
    Judgment,
    Prediction,
    TriageUpdated,
)
from services.system.rabbitmq import RabbitNode

# Fixed numbers so that tests do not depend on the committed (calibrated) policy file.
TEST_POLICY = Policy(FusionWeights(), Thresholds(urgent=0.9, suspected=0.7, rule_out=0.2))


def write_test_policy(path: Path, policy: Policy = TEST_POLICY) -> Path:
    policy.save(path)
    return path


def ref(sop: str, study: str = "1.2.826.0.1.99.1", storage_uri: str = "") -> ImageRef:
    return ImageRef(
        study_instance_uid=study,
        series_instance_uid=study + ".1",
        sop_instance_uid=sop,
        sop_class_uid="1.2.840.10008.5.1.4.1.1.1.1",
        storage_uri=storage_uri,
        sha256="ab" * 32,
    )


def received(sop: str, study: str = "1.2.826.0.1.99.1", eligible: bool = True, **kw: Any) -> ImageReceived:
    msg = ImageReceived(
        image=ref(sop, study, kw.pop("storage_uri", "")),
        modality="DX",
        body_part_examined="CHEST",
        view_position="PA",
        patient_age_years=4,
        triage_eligible=eligible,
        not_triaged_reason="" if eligible else "view position LL is not triaged",
        **kw,
    )
    msg.received_at.GetCurrentTime()
    return msg


def rejected(sop: str, study: str = "1.2.826.0.1.99.1") -> ImageRejected:
    msg = ImageRejected(image=ref(sop, study), reason_code="wrong_modality", reason="modality CT is not triaged")
    msg.received_at.GetCurrentTime()
    return msg


def prediction(sop: str, p: float, version: str = "1", study: str = "1.2.826.0.1.99.1", **kw: Any) -> Prediction:
    msg = Prediction(
        image=ref(sop, study), probability=p, model_name="pneumonia", model_version=version, runtime="onnxruntime", **kw
    )
    msg.predicted_at.GetCurrentTime()
    return msg


def judgment(
    sop: str, jid: str, pneumonia: bool, trust: float = 0.9, sure: bool = True, study: str = "1.2.826.0.1.99.1"
) -> Judgment:
    msg = Judgment(
        image=ref(sop, study),
        judgment_id=jid,
        annotator_id=f"ann-{jid}",
        answer=Answer.ANSWER_PNEUMONIA if pneumonia else Answer.ANSWER_HEALTHY,
        confidence=Confidence.CONFIDENCE_SURE if sure else Confidence.CONFIDENCE_PROBABLY,
        annotator_trust=trust,
    )
    msg.submitted_at.GetCurrentTime()
    return msg


ROUTING = {
    ImageReceived: "image.received",
    ImageRejected: "image.rejected",
    Prediction: "prediction.made",
    Judgment: "judgment.submitted",
}


def message_id(msg: Any) -> str:
    sop = msg.image.sop_instance_uid
    if isinstance(msg, Prediction):
        return f"inference:{sop}:{msg.model_version}"
    if isinstance(msg, Judgment):
        return f"labeling:{sop}:{msg.judgment_id}"
    return f"ingest:{sop}"


async def publish(broker: Broker, msg: Any) -> None:
    await broker.publish(ROUTING[type(msg)], msg, message_id=message_id(msg), correlation_id=msg.image.sop_instance_uid)


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


async def apply_events(agg: Aggregator, *messages: Any) -> None:
    """Apply events straight through the store (for tests that are not about the broker)."""
    for msg in messages:
        async with agg.lock_for(msg.image.study_instance_uid), agg.sessions() as s:
            change = await agg.store.apply(s, msg, trigger=message_id(msg))
            await s.commit()
        agg.after_commit(change)


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
