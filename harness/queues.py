"""The one way tests read a RabbitMQ queue: take its messages off (each acked, so removed), or wait
for its depth.

    msgs = await take(broker.connection, "aggregator.events", count=5, keep=is_prediction)
    msgs = take_sync(rabbit.url, "aggregator.events")         # everything there now, from sync code
    depths = await wait_depths(rabbit, {"aggregator.events": 0})

`take` with `count` waits (up to `timeout`) for that many kept messages and, with `settle`, until no
more came for that long (a test that proves nothing extra arrives); without `count` it takes what
the queue holds now. It returns what it got either way: the caller asserts on it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Mapping
from typing import Any

import aio_pika
from aio_pika.abc import AbstractConnection, AbstractIncomingMessage

from harness.wait import eventually_async
from services.core.contracts import MESSAGE_BY_ROUTING_KEY
from services.core.lanes import split_routing_key

Keep = Callable[[AbstractIncomingMessage], bool]
POLL_S = 0.1


async def take(
    source: AbstractConnection | str,
    queue: str,
    count: int = 0,
    timeout: float = 60.0,
    settle: float = 0.0,
    keep: Keep | None = None,
    remove: bool = True,
) -> list[AbstractIncomingMessage]:
    """Messages taken off `queue` (acked: removed) until `count` of them passed `keep` (the others
    are taken and dropped), or `timeout` passed. With `settle`, keep taking until none came for that
    long; without, stop at `count`. `count=0`: until the queue is empty. `source`: an open
    connection or an AMQP URL. `remove=False` peeks: nothing is acked, and closing the channel
    puts every message back."""
    connection = await aio_pika.connect(source) if isinstance(source, str) else source
    got: list[AbstractIncomingMessage] = []
    channel = await connection.channel()
    try:
        q = await channel.get_queue(queue)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        quiet_since = loop.time()
        while loop.time() < deadline:
            if count and len(got) >= count and settle <= 0:
                break  # exactly `count`: what came after stays in the queue
            message = await q.get(no_ack=False, fail=False, timeout=30)
            if message is not None:
                if remove:
                    await message.ack()
                quiet_since = loop.time()
                if keep is None or keep(message):
                    got.append(message)
                continue
            if len(got) >= count and loop.time() - quiet_since >= settle:
                break
            await asyncio.sleep(POLL_S)  # the poll interval of an empty queue
    finally:
        await channel.close()
        if isinstance(source, str):
            await connection.close()
    return got


def take_sync(url: str, queue: str, **kw: Any) -> list[AbstractIncomingMessage]:
    """`take` from synchronous code (a private event loop on a thread of its own, so it works next
    to Playwright's sync API, which keeps a loop running on the calling thread)."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["got"] = asyncio.run(take(url, queue, **kw))
        except BaseException as exc:  # handed to the caller below
            box["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if "error" in box:
        raise box["error"]
    return list(box["got"])


def payload(message: AbstractIncomingMessage) -> Any:
    """The decoded protobuf of a message (dead letters keep their x-original-routing-key)."""
    key = (message.headers or {}).get("x-original-routing-key") or message.routing_key
    return MESSAGE_BY_ROUTING_KEY[split_routing_key(str(key))[0]].FromString(message.body)  # a lane's key too


def routing_key_is(*keys: str) -> Keep:
    return lambda message: message.routing_key in keys


async def wait_depths(
    rabbit: Any, expected: Mapping[str, int], vhost: str = "/", timeout: float = 60.0
) -> dict[str, int]:
    """Poll `rabbitmqctl list_queues` (ready + unacked) until every named queue holds the expected
    number of messages (a missing queue counts as not there yet); returns all the depths."""
    depths: dict[str, int] = {}

    async def reached() -> bool:
        depths.clear()
        depths.update(await asyncio.to_thread(rabbit.queue_depths, vhost))
        return all(depths.get(q, -1) == n for q, n in expected.items())

    await eventually_async(reached, timeout, 0.2, what=lambda: f"queue depths {dict(expected)} (now {depths})")
    return dict(depths)
