"""The broker kernel against a real RabbitMQ node: confirms, routing, retry with back-off, DLQ."""

from __future__ import annotations

import asyncio
import logging

import pytest

from harness.queues import take
from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.core.broker import CONSUMERS, Broker, ConsumerSpec, Envelope, PermanentError
from services.core.contracts import ImageReceived, ImageRef, Prediction


def _received(uid: str) -> ImageReceived:
    return ImageReceived(image=ImageRef(sop_instance_uid=uid, study_instance_uid="1.2", sha256="ab" * 32))


async def test_image_received_reaches_every_consumer_queue(broker: Broker, rabbit: RabbitNode) -> None:
    await broker.publish("image.received", _received("1.2.3"), message_id="m1", correlation_id="c1")
    depths = rabbit.queue_depths()
    assert depths["inference.images"] == 1
    assert depths["labeling.images"] == 1
    assert depths["aggregator.events"] == 1


async def test_publish_refuses_mismatched_message(broker: Broker) -> None:
    with pytest.raises(ValueError):
        await broker.publish("image.received", Prediction(), message_id="x")


async def test_consumer_gets_decoded_payload_and_headers(broker: Broker) -> None:
    got: asyncio.Queue[Envelope] = asyncio.Queue()

    async def handler(env: Envelope) -> None:
        await got.put(env)

    await broker.consume(CONSUMERS["inference"], handler)
    await broker.publish("image.received", _received("9.9"), message_id="m2", correlation_id="corr-9")
    env = await asyncio.wait_for(got.get(), 10)
    assert isinstance(env.payload, ImageReceived)
    assert env.payload.image.sop_instance_uid == "9.9"
    assert env.correlation_id == "corr-9"
    assert env.headers["x-schema-version"] == "1"


async def test_transient_failure_is_retried_then_succeeds(rabbit: RabbitNode) -> None:
    spec = ConsumerSpec("inference", "inference.images", ("image.received",), retry_delays_ms=(200, 400))
    b = await Broker(rabbit.url).connect()
    from tests.conftest import purge_all

    await purge_all(b)
    attempts: list[int] = []
    done = asyncio.Event()

    async def flaky(env: Envelope) -> None:
        attempts.append(env.retry_count)
        if len(attempts) < 3:
            raise ConnectionError("model server down")
        done.set()

    # the retry queues for these delays must exist: declare them like the real topology would
    assert b.connection is not None
    ch = await b.connection.channel()
    for d in spec.retry_delays_ms:
        await ch.declare_queue(
            spec.retry_queue(d),
            durable=True,
            arguments={"x-message-ttl": d, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": spec.queue},
        )
    await b.consume(spec, flaky)
    await b.publish("image.received", _received("7.7"), message_id="m3")
    await asyncio.wait_for(done.wait(), 15)
    assert attempts == [0, 1, 2]
    for d in spec.retry_delays_ms:
        await (await ch.get_queue(spec.retry_queue(d))).delete(if_unused=False, if_empty=False)
    await b.close()


async def test_permanent_error_goes_to_dead_letter_queue_with_reason(broker: Broker, rabbit: RabbitNode) -> None:
    seen = asyncio.Event()

    async def poison(env: Envelope) -> None:
        seen.set()
        raise PermanentError("pixel data cannot be decoded")

    await broker.consume(CONSUMERS["labeling"], poison)
    await broker.publish("image.received", _received("6.6"), message_id="m4")
    await asyncio.wait_for(seen.wait(), 10)
    assert broker.connection is not None
    dead = await take(broker.connection, "labeling.images.dlq", count=1, timeout=5)
    assert len(dead) == 1
    msg = dead[0]
    assert msg.headers["x-death-reason"] == "pixel data cannot be decoded"
    assert msg.headers["x-original-routing-key"] == "image.received"


async def test_undecodable_body_is_dead_lettered(broker: Broker) -> None:
    import aio_pika

    called = False

    async def handler(env: Envelope) -> None:
        nonlocal called
        called = True

    await broker.consume(CONSUMERS["aggregator"], handler)
    assert broker.connection is not None
    ch = await broker.connection.channel()
    ex = await ch.get_exchange("triage")
    await ex.publish(aio_pika.Message(b"\xff\xff\xff not protobuf", message_id="bad"), routing_key="prediction.made")
    dead = await take(broker.connection, "aggregator.events.dlq", count=1, timeout=5)
    assert len(dead) == 1 and "undecodable" in dead[0].headers["x-death-reason"]
    assert not called


async def test_connect_with_retry_waits_for_the_broker_and_gives_up_on_stop(
    rabbit: RabbitNode, caplog: pytest.LogCaptureFixture
) -> None:
    stop = asyncio.Event()
    rabbit.stop_app()
    try:
        b = Broker(rabbit.url)
        with caplog.at_level(logging.WARNING, logger="services.core.broker"):
            attempt = asyncio.create_task(b.connect_with_retry(stop, max_delay=0.5))
            # each failed attempt is logged: three of them, and it is still trying
            failures = lambda: sum("not reachable" in r.getMessage() for r in caplog.records)  # noqa: E731
            await eventually_async(lambda: failures() >= 3, 30, what=lambda: f"3 failed attempts ({failures()})")
        assert not attempt.done(), "must keep retrying while the broker is down"
    finally:
        rabbit.start_app()
    assert await asyncio.wait_for(attempt, 30) is True
    assert b.is_connected
    await b.close()

    stop.set()
    assert await Broker("amqp://guest:guest@127.0.0.1:1/").connect_with_retry(stop) is False
