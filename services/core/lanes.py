"""Lanes: fresh work before backfill work, on classic and quorum queues alike (issue 24).

Ingest classes every image *fresh* (a patient waiting now) or *backfill* (a catch-up after an outage,
a migration, an old study) and writes it into `ImageRef.lane`, which every later event about the
image copies. The broker turns the lane into topology, not into message priorities:

- a backfill event is published as `<routing key>.backfill` (e.g. `image.received.backfill`) and
  lands in each consumer's second queue `<queue>.backfill` (with its own retry queues and DLQ);
  fresh events keep the plain routing keys and queues. Topic bindings match words exactly, so
  neither lane's queue ever sees the other's events.
- a consumer (`Broker.consume`, `Broker.consume_batch`) reads both queues, each on its own channel
  with its own prefetch, and hands messages to its handler through a `LaneGate`: a fixed number of
  handler slots, a free slot goes to a waiting fresh message first. A backlog therefore waits in
  RabbitMQ (or at the gate), never ahead of a fresh image; when the fresh lane is idle the backfill
  lane has every slot, and while fresh work never stops, one slot in `burst + 1` still goes to
  backfill, so it is never starved.

Why not message priorities: RabbitMQ quorum queues (the cluster set-up, PT_QUORUM_QUEUES) have no
`x-max-priority` before 3.13 (Debian ships 3.10), and even on classic queues a priority only orders
what is still *in the queue*: messages already prefetched by a consumer are served first-in
first-out. Two queues plus per-consumer prefetch and a client-side gate work the same on both queue
types, and keep each lane's depth, age and drain rate visible on its own (`LaneMonitor`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from google.protobuf.message import Message
from prometheus_client import Counter, Gauge

log = logging.getLogger(__name__)

FRESH = "fresh"
BACKFILL = "backfill"
LANES = (FRESH, BACKFILL)
SUFFIX = "." + BACKFILL

QUEUE_DEPTH = Gauge(
    "pt_lane_queue_depth",
    "Messages waiting for this stage in this lane: ready in RabbitMQ plus delivered and not yet handled here",
    ["stage", "lane"],
)
OLDEST_AGE = Gauge(
    "pt_lane_oldest_age_seconds",
    "Age (since publication) of the oldest message waiting for this stage in this lane (0 when none waits)",
    ["stage", "lane"],
)
DRAIN_RATE = Gauge(
    "pt_lane_drain_rate", "Messages handled per second by this process in this lane (moving average)", ["stage", "lane"]
)
ETA = Gauge(
    "pt_lane_eta_seconds",
    "Queue depth / drain rate: when this lane's backlog is done at the current rate (-1: not draining)",
    ["stage", "lane"],
)
HANDLED = Counter("pt_lane_messages_total", "Messages handled, by stage and lane", ["stage", "lane"])


def normalise(lane: str) -> str:
    return BACKFILL if lane == BACKFILL else FRESH


def lane_of(message: Message) -> str:
    """The lane of an event: its `image.lane` (events without an image are fresh)."""
    if "image" not in message.DESCRIPTOR.fields_by_name:
        return FRESH
    return normalise(message.image.lane)  # type: ignore[attr-defined]


def routing_key_for(base: str, lane: str) -> str:
    return base + SUFFIX if lane == BACKFILL else base


def split_routing_key(key: str) -> tuple[str, str]:
    """("image.received.backfill") -> ("image.received", "backfill")."""
    if key.endswith(SUFFIX):
        return key[: -len(SUFFIX)], BACKFILL
    return key, FRESH


class LaneGate:
    """`slots` handler slots shared by the lanes; a freed slot goes to a waiting fresh message first,
    except that after `burst` fresh grants in a row while backfill waits, one backfill goes."""

    def __init__(self, slots: int, burst: int = 16) -> None:
        self.slots = max(1, slots)
        self.burst = max(1, burst)
        self._free = self.slots
        self._waiting: dict[str, deque[asyncio.Future[None]]] = {FRESH: deque(), BACKFILL: deque()}
        self._fresh_run = 0

    def waiting(self, lane: str) -> int:
        return sum(1 for f in self._waiting[lane] if not f.done())

    @property
    def busy(self) -> int:
        return self.slots - self._free

    async def acquire(self, lane: str) -> None:
        lane = normalise(lane)
        if self._free > 0 and not self.waiting(FRESH) and not self.waiting(BACKFILL):
            self._free -= 1
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting[lane].append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # granted and cancelled at once: give it back
                self.release()
            else:
                with contextlib.suppress(ValueError):
                    self._waiting[lane].remove(fut)
            raise

    def release(self) -> None:
        self._free += 1
        while self._free > 0:
            fut = self._next()
            if fut is None:
                return
            self._free -= 1
            fut.set_result(None)

    def _next(self) -> asyncio.Future[None] | None:
        for q in self._waiting.values():
            while q and q[0].done():
                q.popleft()
        fresh, backfill = self._waiting[FRESH], self._waiting[BACKFILL]
        if fresh and (not backfill or self._fresh_run < self.burst):
            self._fresh_run = self._fresh_run + 1 if backfill else 0
            return fresh.popleft()
        if backfill:
            self._fresh_run = 0
            return backfill.popleft()
        return None

    @contextlib.asynccontextmanager
    async def slot(self, lane: str) -> Any:
        await self.acquire(lane)
        try:
            yield
        finally:
            self.release()


@dataclass
class _LaneState:
    handled: int = 0
    last_handled: int = 0
    rate: float = 0.0
    held: dict[int, float] = field(default_factory=dict)  # id(message) -> published at (epoch s)
    last_taken_ts: float | None = None  # publication time of the newest message delivered here
    ready: int = 0


class LaneMonitor:
    """Per stage and lane: depth, age of the oldest waiting message, drain rate and ETA (the
    `pt_lane_*` gauges), from RabbitMQ's ready count (a passive declare every `interval` s) and
    what this process holds. `depth_of(queue)` is an async callable returning the ready count."""

    def __init__(self, stage: str, queues: dict[str, str], interval: float = 2.0, tau: float = 20.0) -> None:
        self.stage = stage
        self.queues = queues  # lane -> queue name
        self.interval = interval
        self.tau = tau
        self.state = {lane: _LaneState() for lane in queues}
        self._last = time.monotonic()

    def taken(self, lane: str, key: int, published_at: float | None) -> None:
        st = self.state[normalise(lane)]
        ts = published_at if published_at is not None else time.time()
        st.held[key] = ts
        st.last_taken_ts = ts

    def done(self, lane: str, key: int) -> None:
        lane = normalise(lane)
        st = self.state[lane]
        st.held.pop(key, None)
        st.handled += 1
        HANDLED.labels(self.stage, lane).inc()

    def snapshot(self, lane: str) -> dict[str, float]:
        st = self.state[lane]
        now = time.time()
        depth = st.ready + len(st.held)
        if st.held:
            age = now - min(st.held.values())
        elif st.ready and st.last_taken_ts is not None:
            age = now - st.last_taken_ts  # the head of the queue came after the last one delivered
        else:
            age = 0.0
        eta = depth / st.rate if st.rate > 1e-6 else (0.0 if depth == 0 else -1.0)
        return {"depth": float(depth), "oldest_age_s": max(0.0, age), "rate": st.rate, "eta_s": eta}

    def update(self, ready: dict[str, int]) -> None:
        now = time.monotonic()
        dt = max(1e-3, now - self._last)
        self._last = now
        alpha = 1.0 - pow(2.718281828, -dt / self.tau)
        for lane, st in self.state.items():
            st.ready = ready.get(lane, st.ready)
            inst = (st.handled - st.last_handled) / dt
            st.last_handled = st.handled
            st.rate = inst if st.rate == 0.0 else st.rate + alpha * (inst - st.rate)
            snap = self.snapshot(lane)
            QUEUE_DEPTH.labels(self.stage, lane).set(snap["depth"])
            OLDEST_AGE.labels(self.stage, lane).set(snap["oldest_age_s"])
            DRAIN_RATE.labels(self.stage, lane).set(snap["rate"])
            ETA.labels(self.stage, lane).set(snap["eta_s"])

    async def run(self, ready_count: Callable[[str], Any]) -> None:
        """Poll each lane's ready count forever (cancel to stop); a failed poll keeps the last value."""
        while True:
            counts: dict[str, int] = {}
            for lane, queue in self.queues.items():
                try:
                    counts[lane] = int(await ready_count(queue))
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # broker away: the consumer reconnects, we try again
                    log.debug("queue depth not read", extra={"queue": queue, "error": repr(exc)})
            self.update(counts)
            await asyncio.sleep(self.interval)  # the polling interval, not synchronisation
