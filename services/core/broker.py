"""RabbitMQ topology, publish-with-confirm and consume-with-retry, on aio-pika.

Topology (declared idempotently by every service at start-up, so no event is ever unroutable):

    exchange "triage" (topic, durable)
      queue inference.images      <- image.received, rescore.requested
      queue labeling.images       <- image.received
      queue aggregator.events     <- image.received, image.rejected, prediction.made,
                                     judgment.submitted, label.aggregated
      and per queue Q its backfill lane Q.backfill <- the same keys + ".backfill" (services/core/lanes.py)
    per queue Q:
      Q.retry.<ms>   (one per back-off step; message TTL, then dead-lettered back to Q only)
      Q.dlq          (poison messages, with x-death-reason; also Q's own dead-letter target)

Messages are persistent protobuf bodies; headers carry x-message-type, x-schema-version and
x-correlation-id. Consumers ack only after their handler returns (after their DB commit); a handler
raises PermanentError for input that can never succeed (straight to the DLQ with the reason) and
any other exception for transient faults (retried with back-off, then dead-lettered).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aio_pika
import aiormq
import aiormq.abc
from aio_pika.abc import (
    AbstractChannel,
    AbstractExchange,
    AbstractIncomingMessage,
    AbstractQueue,
    AbstractRobustConnection,
)
from google.protobuf.message import DecodeError, Message
from prometheus_client import Counter, Gauge, Histogram

from services.core import amqp_blocked_close
from services.core.contracts import MESSAGE_BY_ROUTING_KEY, SCHEMA_VERSION
from services.core.lanes import BACKFILL, FRESH, LaneGate, LaneMonitor, lane_of, routing_key_for, split_routing_key
from services.core.telemetry import bound_correlation_id

log = logging.getLogger(__name__)
# a connection that closes while RabbitMQ blocks it (memory/disk alarm) must not leave its channels
# unrestorable: see amqp_blocked_close.py
amqp_blocked_close.install()

EXCHANGE = "triage"
RETRY_DELAYS_MS: tuple[int, ...] = (1_000, 5_000, 30_000)


@dataclass(frozen=True)
class ConsumerSpec:
    name: str
    queue: str
    bindings: tuple[str, ...]
    retry_delays_ms: tuple[int, ...] = RETRY_DELAYS_MS

    @property
    def dlq(self) -> str:
        return f"{self.queue}.dlq"

    def retry_queue(self, delay_ms: int) -> str:
        return f"{self.queue}.retry.{delay_ms}"

    def lane(self, lane: str) -> ConsumerSpec:
        """This consumer's queue for `lane`: itself for fresh, `<queue>.backfill` (bound to the
        backfill routing keys, with its own retry queues and DLQ) for backfill."""
        if lane != BACKFILL:
            return self
        return ConsumerSpec(
            self.name,
            f"{self.queue}.{BACKFILL}",
            tuple(routing_key_for(k, BACKFILL) for k in self.bindings),
            self.retry_delays_ms,
        )


CONSUMERS: dict[str, ConsumerSpec] = {
    "inference": ConsumerSpec("inference", "inference.images", ("image.received", "rescore.requested")),
    "labeling": ConsumerSpec("labeling", "labeling.images", ("image.received",)),
    "aggregator": ConsumerSpec(
        "aggregator",
        "aggregator.events",
        ("image.received", "image.rejected", "prediction.made", "judgment.submitted", "label.aggregated"),
    ),
}

MESSAGES_CONSUMED = Counter(
    "pt_broker_messages_consumed_total", "Messages handled, by queue and outcome", ["queue", "outcome"]
)
BATCHES_FAILED = Counter(
    "pt_broker_batches_failed_total",
    "Batches whose handler raised (their messages were then handled one by one)",
    ["queue"],
)
BATCH_SIZE = Histogram(
    "pt_broker_batch_size",
    "Messages per batch handed to a batch consumer (consume_batch): small batches cost more per message",
    ["queue"],
    buckets=(1, 2, 4, 8, 16, 32, 64, 128),
)
MESSAGES_PUBLISHED = Counter("pt_broker_messages_published_total", "Messages published (confirmed)", ["routing_key"])
PUBLISHES_UNCONFIRMED = Gauge(
    "pt_broker_publishes_unconfirmed", "Publishes sent (or being sent) whose broker confirm has not come back yet"
)


@dataclass(frozen=True)
class Outgoing:
    """One message for Broker.publish_many."""

    routing_key: str
    message: Message
    message_id: str
    correlation_id: str | None = None


class PermanentError(Exception):
    """The message can never be processed (bad input): dead-letter it with this reason."""


@dataclass
class Envelope:
    routing_key: str
    payload: Message
    message_id: str | None
    correlation_id: str | None
    headers: dict[str, Any]
    redelivered: bool
    retry_count: int
    raw: AbstractIncomingMessage = field(repr=False)
    lane: str = FRESH


def decode(message: AbstractIncomingMessage) -> Envelope:
    headers = dict(message.headers or {})
    routing_key, lane = split_routing_key(str(headers.get("x-original-routing-key") or message.routing_key or ""))
    cls = MESSAGE_BY_ROUTING_KEY.get(routing_key)
    if cls is None:
        raise PermanentError(f"unknown routing key {routing_key!r}")
    expected_type = cls.DESCRIPTOR.full_name
    if message.type and message.type != expected_type:
        raise PermanentError(f"message type {message.type!r} does not match routing key {routing_key!r}")
    payload = cls()
    try:
        payload.ParseFromString(message.body)
    except DecodeError as exc:
        raise PermanentError(f"undecodable {expected_type} body: {exc}") from exc
    return Envelope(
        routing_key=routing_key,
        payload=payload,
        message_id=message.message_id,
        correlation_id=message.correlation_id or headers.get("x-correlation-id"),
        headers=headers,
        redelivered=bool(message.redelivered),
        retry_count=int(headers.get("x-retry-count", 0)),
        raw=message,
        lane=lane,
    )


async def declare_topology(
    channel: AbstractChannel, exchange_name: str = EXCHANGE, quorum: bool = False
) -> AbstractExchange:
    """Declare the exchange and every consumer's queues; safe to call any number of times."""
    exchange = await channel.declare_exchange(exchange_name, aio_pika.ExchangeType.TOPIC, durable=True)
    for spec in (base.lane(lane) for base in CONSUMERS.values() for lane in (FRESH, BACKFILL)):
        await declare_consumer(channel, exchange, spec, quorum)
    return exchange


async def declare_consumer(
    channel: AbstractChannel, exchange: AbstractExchange, spec: ConsumerSpec, quorum: bool = False
) -> None:
    """One consumer queue with its bindings, retry queues and DLQ (idempotent)."""
    queue_type = {"x-queue-type": "quorum"} if quorum else {}
    await channel.declare_queue(spec.dlq, durable=True, arguments=dict(queue_type))
    main = await channel.declare_queue(
        spec.queue,
        durable=True,
        arguments={**queue_type, "x-dead-letter-exchange": "", "x-dead-letter-routing-key": spec.dlq},
    )
    for key in spec.bindings:
        await main.bind(exchange, routing_key=key)
    for delay in spec.retry_delays_ms:
        await channel.declare_queue(
            spec.retry_queue(delay),
            durable=True,
            arguments={
                **queue_type,
                "x-message-ttl": delay,
                "x-dead-letter-exchange": "",
                "x-dead-letter-routing-key": spec.queue,
            },
        )


def build_message(
    message: Message,
    *,
    message_id: str,
    correlation_id: str | None = None,
    headers: dict[str, Any] | None = None,
) -> aio_pika.Message:
    return aio_pika.Message(
        body=message.SerializeToString(),
        delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
        content_type="application/x-protobuf",
        type=message.DESCRIPTOR.full_name,
        message_id=message_id,
        correlation_id=correlation_id,
        timestamp=time.time(),
        headers={
            "x-message-type": message.DESCRIPTOR.full_name,
            "x-schema-version": SCHEMA_VERSION,
            "x-correlation-id": correlation_id or "",
            **(headers or {}),
        },
    )


def _published_at(message: AbstractIncomingMessage) -> float | None:
    ts = message.timestamp
    return ts.timestamp() if ts is not None else None


Handler = Callable[[Envelope], Awaitable[None]]
BatchHandler = Callable[[list[Envelope]], Awaitable[None]]


class Broker:
    """One robust connection, a confirming channel for publishing, and consumers."""

    def __init__(self, url: str, exchange_name: str = EXCHANGE, quorum: bool = False) -> None:
        self.url = url
        self.exchange_name = exchange_name
        self.quorum = quorum
        self.connection: AbstractRobustConnection | None = None
        self._channel: AbstractChannel | None = None
        self._exchange: AbstractExchange | None = None
        self._workers: list[asyncio.Task[None]] = []
        self.unconfirmed = 0  # this broker's publishes awaiting their confirm now (see publish_many)

    async def connect(self, timeout: float = 10.0) -> Broker:
        self.connection = await aio_pika.connect_robust(self.url, timeout=timeout)
        self._channel = await self.connection.channel(publisher_confirms=True)
        self._exchange = await declare_topology(self._channel, self.exchange_name, self.quorum)
        return self

    async def connect_with_retry(
        self,
        stop: asyncio.Event,
        max_delay: float = 10.0,
        on_retry: Callable[[BaseException], Awaitable[None]] | None = None,
    ) -> bool:
        """Connect, retrying with exponential back-off until it works (True) or `stop` is set (False).

        Services start before the broker is reachable (or while it restarts) without crashing; the
        one retry loop of every service (see services/core/runner.with_broker). `on_retry(error)` runs
        after each failed attempt (e.g. ingest updates its outbox-backlog gauge).
        """
        delay = 0.5
        while not stop.is_set():
            try:
                await self.connect()
                return True
            except Exception as exc:
                log.warning("broker not reachable yet", extra={"error": repr(exc), "retry_in_s": delay})
                if on_retry is not None:
                    with contextlib.suppress(Exception):
                        await on_retry(exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=delay)
                delay = min(delay * 2, max_delay)
        return False

    async def close(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._workers.clear()
        if self.connection is not None:
            await self.connection.close()
            self.connection = None

    @property
    def is_connected(self) -> bool:
        return self.connection is not None and not self.connection.is_closed

    async def publish(
        self,
        routing_key: str,
        message: Message,
        *,
        message_id: str,
        correlation_id: str | None = None,
        headers: dict[str, Any] | None = None,
        timeout: float = 10.0,
    ) -> None:
        """Publish persistently and wait for the broker's confirm (raises if not confirmed)."""
        exchange = self._publishing_exchange()
        self._check(routing_key, message)
        msg = build_message(message, message_id=message_id, correlation_id=correlation_id, headers=headers)
        await self._confirmed(exchange, exchange.name, msg, routing_key_for(routing_key, lane_of(message)), timeout)

    async def publish_many(self, items: Sequence[Outgoing], timeout: float = 10.0) -> list[BaseException | None]:
        """Publish every item persistently, in order, with their confirms outstanding together (one
        round trip for the lot instead of one each); returns, per item, None when the broker
        confirmed it or the error (nack, timeout, connection lost, a message that does not match
        its routing key: that one is not sent). Never raises for an item: the caller decides.

        Wire order = `items` order: the publishes start as tasks in that order (asyncio runs new
        tasks first-in first-out) and each queues its frames under aiormq's channel lock, which is
        first-come first-served. They go straight to the channel (aiormq `basic_publish` with
        wait=False: no socket drain awaited per message, ~15 % less CPU than aio-pika's
        Exchange.publish, same frames, same confirm). Everything in `items` is in flight at once,
        so the caller bounds it (the outbox relay: its batch size).
        """
        exchange = self._publishing_exchange()
        results: list[BaseException | None] = [None] * len(items)
        valid: list[int] = []
        for i, item in enumerate(items):
            try:
                self._check(item.routing_key, item.message)
                valid.append(i)
            except ValueError as exc:
                results[i] = exc
        if not valid:
            return results
        try:  # as Exchange.publish: a closed channel fails at once, a reconnecting one is waited for
            if exchange.channel.is_closed:
                raise aiormq.exceptions.ChannelInvalidStateError(f"{exchange.channel!r} closed")
            async with asyncio.timeout(timeout):
                channel = await exchange.channel.get_underlay_channel()
        except Exception as exc:
            for i in valid:
                results[i] = exc
            return results
        sends = []
        for i in valid:
            item = items[i]
            msg = build_message(item.message, message_id=item.message_id, correlation_id=item.correlation_id)
            key = routing_key_for(item.routing_key, lane_of(item.message))  # a backfill image's lane
            sends.append(self._confirmed(channel, exchange.name, msg, key, timeout))
        outcomes = await asyncio.gather(*sends, return_exceptions=True)
        for i, outcome in zip(valid, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                results[i] = outcome
        return results

    def _publishing_exchange(self) -> AbstractExchange:
        if self._exchange is None:
            raise RuntimeError("Broker.connect() first")
        return self._exchange

    @staticmethod
    def _check(routing_key: str, message: Message) -> None:
        expected = MESSAGE_BY_ROUTING_KEY.get(routing_key)
        if expected is None or not isinstance(message, expected):
            raise ValueError(f"{type(message).__name__} cannot be published as {routing_key!r}")

    async def _confirmed(
        self,
        target: AbstractExchange | aiormq.abc.AbstractChannel,
        exchange_name: str,
        msg: aio_pika.Message,
        routing_key: str,
        timeout: float,
    ) -> None:
        """Publish msg and wait for its confirm, counted in `unconfirmed` meanwhile."""
        self.unconfirmed += 1
        PUBLISHES_UNCONFIRMED.inc()
        try:
            if isinstance(target, aiormq.abc.AbstractChannel):
                await target.basic_publish(
                    msg.body,
                    exchange=exchange_name,
                    routing_key=routing_key,
                    properties=msg.properties,
                    mandatory=True,  # as Exchange.publish
                    timeout=timeout,
                    wait=False,
                )
            else:
                await target.publish(msg, routing_key=routing_key, timeout=timeout)
        finally:
            self.unconfirmed -= 1
            PUBLISHES_UNCONFIRMED.dec()
        MESSAGES_PUBLISHED.labels(routing_key).inc()

    async def _lane_channels(
        self, spec: ConsumerSpec, prefetch: int, backfill_prefetch: int | None
    ) -> list[tuple[str, ConsumerSpec, AbstractChannel, AbstractQueue]]:
        """Per lane (fresh first): its spec, a channel with the lane's prefetch, its queue."""
        assert self.connection is not None, "Broker.connect() first"
        out = []
        for lane in (FRESH, BACKFILL):
            lane_spec = spec.lane(lane)
            channel = await self.connection.channel(publisher_confirms=True)
            await channel.set_qos(prefetch_count=prefetch if lane == FRESH else (backfill_prefetch or prefetch))
            exchange = await declare_topology(channel, self.exchange_name, self.quorum)
            if lane == BACKFILL:  # a spec outside CONSUMERS too (its fresh queue is the caller's)
                await declare_consumer(channel, exchange, lane_spec, self.quorum)
            out.append((lane, lane_spec, channel, await channel.get_queue(lane_spec.queue)))
        return out

    def _monitor(self, spec: ConsumerSpec) -> LaneMonitor:
        """Start the pt_lane_* gauges of this consumer (a passive declare per lane every 2 s)."""
        monitor = LaneMonitor(spec.name, {lane: spec.lane(lane).queue for lane in (FRESH, BACKFILL)})
        channels: list[AbstractChannel] = []

        async def ready(queue: str) -> int:
            assert self.connection is not None
            if not channels or channels[0].is_closed:
                channels[:] = [await self.connection.channel()]
            declared = await channels[0].declare_queue(queue, passive=True, robust=False)
            return int(declared.declaration_result.message_count or 0)

        self._workers.append(asyncio.create_task(monitor.run(ready), name=f"lane-monitor-{spec.queue}"))
        return monitor

    async def consume(
        self,
        spec: ConsumerSpec,
        handler: Handler,
        prefetch: int = 16,
        backfill_prefetch: int | None = None,
        burst: int = 16,
    ) -> AbstractQueue:
        """Consume both lanes of spec (services/core/lanes.py) with handler; returns the fresh queue.

        Each lane has its own channel and prefetch (backfill_prefetch, default = prefetch); at most
        `prefetch` handlers run at once, and a free slot goes to a waiting fresh message first
        (after `burst` fresh ones in a row while backfill waits, one backfill message)."""
        gate = LaneGate(prefetch, burst)
        monitor = self._monitor(spec)
        lanes = await self._lane_channels(spec, prefetch, backfill_prefetch)

        def receiver(
            lane: str, lane_spec: ConsumerSpec, channel: AbstractChannel
        ) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
            async def on_message(message: AbstractIncomingMessage) -> None:
                key = id(message)
                monitor.taken(lane, key, _published_at(message))
                async with gate.slot(lane):
                    await self._handle(lane_spec, channel, handler, message)
                monitor.done(lane, key)

            return on_message

        for lane, lane_spec, channel, queue in lanes:
            await queue.consume(receiver(lane, lane_spec, channel))
        return lanes[0][3]

    async def consume_batch(
        self,
        spec: ConsumerSpec,
        handler: Handler,
        batch_handler: BatchHandler,
        prefetch: int = 64,
        max_batch: int = 32,
        max_wait_s: float = 0.0,
        backfill_prefetch: int | None = None,
        burst: int = 16,
    ) -> AbstractQueue:
        """Consume both lanes of spec handing batch_handler every message already delivered (up to
        max_batch) at once, in delivery order, from one worker: a consumer that commits once per batch.

        A batch is of one lane: fresh whenever a fresh message waits (after `burst` fresh batches in
        a row while backfill waits, one backfill batch), so a fresh message waits at most for the
        batch being applied, never for a backlog.
        A batch takes what has already been delivered and, for at most max_wait_s after its first
        message, what arrives next, up to max_batch (prefetch should be larger, so the next batch is
        already here while one is applied). With max_wait_s = 0 a message that arrives alone is
        handled alone. The messages of a batch are acked after batch_handler returns.
        When it raises, each message of the batch goes through handler one by one, with the same
        retry and dead-letter path as consume(): a batch never changes what happens to a message.
        """
        monitor = self._monitor(spec)
        lanes = await self._lane_channels(spec, prefetch, backfill_prefetch)
        inboxes: dict[str, asyncio.Queue[AbstractIncomingMessage]] = {FRESH: asyncio.Queue(), BACKFILL: asyncio.Queue()}
        arrived = asyncio.Event()

        def receiver(lane: str) -> Callable[[AbstractIncomingMessage], Awaitable[None]]:
            async def on_message(message: AbstractIncomingMessage) -> None:
                monitor.taken(lane, id(message), _published_at(message))
                inboxes[lane].put_nowait(message)
                arrived.set()

            return on_message

        by_lane = {lane: (lane_spec, channel) for lane, lane_spec, channel, _ in lanes}

        async def worker() -> None:
            fresh_run = 0
            while True:
                while inboxes[FRESH].empty() and inboxes[BACKFILL].empty():
                    arrived.clear()
                    await arrived.wait()
                backlog_waits = not inboxes[BACKFILL].empty()
                if not inboxes[FRESH].empty() and (not backlog_waits or fresh_run < burst):
                    lane = FRESH
                    fresh_run = fresh_run + 1 if backlog_waits else 0
                else:
                    lane, fresh_run = BACKFILL, 0
                inbox = inboxes[lane]
                batch = [inbox.get_nowait()]
                deadline = time.monotonic() + max_wait_s
                while len(batch) < max_batch:
                    if not inbox.empty():
                        batch.append(inbox.get_nowait())
                        continue
                    remaining = deadline - time.monotonic()
                    if remaining <= 0 or (lane == BACKFILL and not inboxes[FRESH].empty()):
                        break
                    try:
                        batch.append(await asyncio.wait_for(inbox.get(), remaining))
                    except TimeoutError:
                        break
                BATCH_SIZE.labels(spec.queue).observe(len(batch))
                lane_spec, channel = by_lane[lane]
                try:
                    await self._handle_batch(lane_spec, channel, handler, batch_handler, batch)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # e.g. the channel closed under us: the broker redelivers
                    log.warning("batch not settled", extra={"queue": lane_spec.queue, "error": repr(exc)})
                for message in batch:
                    monitor.done(lane, id(message))

        self._workers.append(asyncio.create_task(worker(), name=f"consume-batch-{spec.queue}"))
        for lane, _, _, queue in lanes:
            await queue.consume(receiver(lane))
        return lanes[0][3]

    async def _handle_batch(
        self,
        spec: ConsumerSpec,
        channel: AbstractChannel,
        handler: Handler,
        batch_handler: BatchHandler,
        messages: list[AbstractIncomingMessage],
    ) -> None:
        envelopes: list[Envelope] = []
        decoded: list[AbstractIncomingMessage] = []
        for message in messages:
            try:
                envelopes.append(decode(message))
                decoded.append(message)
            except PermanentError as exc:
                await self._dead_letter(spec, channel, message, str(exc))
                MESSAGES_CONSUMED.labels(spec.queue, "dead_lettered").inc()
        if not envelopes:
            return
        try:
            await batch_handler(envelopes)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            BATCHES_FAILED.labels(spec.queue).inc()
            if len(decoded) > 1:
                log.info(
                    "batch failed, handling its messages one by one",
                    extra={"queue": spec.queue, "messages": len(decoded), "error": repr(exc)},
                )
            for message in decoded:
                await self._handle(spec, channel, handler, message)
            return
        for message in decoded:
            try:
                await message.ack()
            except Exception as exc:  # its channel closed (reconnect): the broker redelivers it
                log.warning("ack failed", extra={"queue": spec.queue, "error": repr(exc)})
                continue
            MESSAGES_CONSUMED.labels(spec.queue, "ok").inc()

    async def _handle(
        self, spec: ConsumerSpec, channel: AbstractChannel, handler: Handler, message: AbstractIncomingMessage
    ) -> None:
        headers = dict(message.headers or {})
        with bound_correlation_id(message.correlation_id or headers.get("x-correlation-id") or None):
            try:
                envelope = decode(message)
                await handler(envelope)
            except PermanentError as exc:
                await self._dead_letter(spec, channel, message, str(exc))
                MESSAGES_CONSUMED.labels(spec.queue, "dead_lettered").inc()
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                retries = int(headers.get("x-retry-count", 0))
                if retries >= len(spec.retry_delays_ms):
                    await self._dead_letter(spec, channel, message, f"retries exhausted: {exc!r}")
                    MESSAGES_CONSUMED.labels(spec.queue, "dead_lettered").inc()
                else:
                    delay = spec.retry_delays_ms[retries]
                    log.warning(
                        "handler failed, retrying",
                        extra={"queue": spec.queue, "attempt": retries + 1, "delay_ms": delay, "error": repr(exc)},
                    )
                    await self._forward(channel, message, spec.retry_queue(delay), {"x-retry-count": retries + 1})
                    MESSAGES_CONSUMED.labels(spec.queue, "retried").inc()
                return
            await message.ack()
            MESSAGES_CONSUMED.labels(spec.queue, "ok").inc()

    async def _dead_letter(
        self, spec: ConsumerSpec, channel: AbstractChannel, message: AbstractIncomingMessage, reason: str
    ) -> None:
        log.error("dead-lettering message", extra={"queue": spec.queue, "reason": reason})
        await self._forward(
            channel, message, spec.dlq, {"x-death-reason": reason[:1000], "x-dead-lettered-at": time.time()}
        )

    @staticmethod
    async def _forward(
        channel: AbstractChannel, message: AbstractIncomingMessage, queue: str, extra_headers: dict[str, Any]
    ) -> None:
        """Copy the message to another queue (confirmed), then ack the original: never lost."""
        headers = dict(message.headers or {})
        headers.setdefault("x-original-routing-key", message.routing_key or "")
        headers.update(extra_headers)
        copy = aio_pika.Message(
            body=message.body,
            delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
            content_type=message.content_type,
            type=message.type,
            message_id=message.message_id,
            correlation_id=message.correlation_id,
            timestamp=message.timestamp,
            headers=headers,
        )
        await channel.default_exchange.publish(copy, routing_key=queue, timeout=10)
        await message.ack()
