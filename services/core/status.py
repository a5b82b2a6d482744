"""`pneumotriage status`: each stage's lanes as an operator sees them while a backlog drains.

Per stage (inference, labeling, aggregator) and lane (fresh, backfill): messages ready in RabbitMQ
(a passive declare: works on classic and quorum queues alike; what consumers hold is not counted),
consumers, and, from the services' `/metrics` where they answer, the age of the oldest waiting
message and the drain rate (`pt_lane_*`, services/core/lanes.py). Without those the drain rate is
taken from the depth's own fall between two samples. `--watch` redraws every `--interval` seconds
with a progress bar per draining lane (done = 1 - depth / the largest depth seen).
"""

from __future__ import annotations

import asyncio
import re
import time
from dataclasses import dataclass, field

import aio_pika

from services.core.broker import CONSUMERS
from services.core.lanes import BACKFILL, FRESH

DEFAULT_METRICS = ("http://127.0.0.1:8002/metrics", "http://127.0.0.1:8003/metrics", "http://127.0.0.1:8004/metrics")
_SAMPLE = re.compile(r'^(pt_lane_\w+)\{(?:lane="(\w+)",stage="(\w+)"|stage="(\w+)",lane="(\w+)")\} (\S+)$')


@dataclass
class LaneRow:
    stage: str
    lane: str
    queue: str
    depth: int = 0
    consumers: int = 0
    oldest_age_s: float | None = None
    rate: float | None = None  # messages/s
    peak: int = 0
    history: list[tuple[float, int]] = field(default_factory=list)

    @property
    def eta_s(self) -> float | None:
        if self.depth == 0:
            return 0.0
        return self.depth / self.rate if self.rate else None


async def queue_counts(url: str, queues: list[str]) -> dict[str, tuple[int, int]]:
    """queue -> (messages ready, consumers); a missing queue is left out."""
    out: dict[str, tuple[int, int]] = {}
    connection = await aio_pika.connect(url, timeout=10)
    try:
        for name in queues:
            channel = await connection.channel()
            try:
                queue = await channel.declare_queue(name, passive=True)
            except aio_pika.exceptions.ChannelClosed:
                continue
            result = queue.declaration_result
            out[name] = (int(result.message_count or 0), int(result.consumer_count or 0))
            await channel.close()
    finally:
        await connection.close()
    return out


def parse_metrics(text: str) -> dict[tuple[str, str, str], float]:
    """(metric, stage, lane) -> value for the pt_lane_* gauges of one /metrics page."""
    out: dict[tuple[str, str, str], float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line.strip())
        if m:
            lane, stage = (m.group(2), m.group(3)) if m.group(2) else (m.group(5), m.group(4))
            out[(m.group(1), stage, lane)] = float(m.group(6))
    return out


def scrape(urls: tuple[str, ...], timeout: float = 0.5) -> dict[tuple[str, str, str], float]:
    import httpx

    merged: dict[tuple[str, str, str], float] = {}
    for url in urls:
        try:
            text = httpx.get(url, timeout=timeout).text
        except httpx.HTTPError:
            continue
        for key, value in parse_metrics(text).items():
            if key[0] == "pt_lane_oldest_age_seconds":
                merged[key] = max(merged.get(key, 0.0), value)
            elif key[0] == "pt_lane_drain_rate":
                merged[key] = merged.get(key, 0.0) + value  # competing consumers add up
    return merged


def rows() -> list[LaneRow]:
    return [
        LaneRow(spec.name, lane, spec.lane(lane).queue) for spec in CONSUMERS.values() for lane in (FRESH, BACKFILL)
    ]


def update(table: list[LaneRow], counts: dict[str, tuple[int, int]], metrics: dict, now: float) -> None:
    for row in table:
        row.depth, row.consumers = counts.get(row.queue, (0, 0))
        row.peak = max(row.peak, row.depth)
        row.history = [(t, d) for t, d in row.history if now - t <= 30.0] + [(now, row.depth)]
        row.oldest_age_s = metrics.get(("pt_lane_oldest_age_seconds", row.stage, row.lane))
        rate = metrics.get(("pt_lane_drain_rate", row.stage, row.lane))
        if rate is None and len(row.history) >= 2:  # the depth's fall over the last 30 s
            (t0, d0), (t1, d1) = row.history[0], row.history[-1]
            rate = max(0.0, (d0 - d1) / (t1 - t0)) if t1 > t0 else None
        row.rate = rate


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = round(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def bar(done: float, width: int = 24) -> str:
    done = min(1.0, max(0.0, done))
    filled = round(done * width)
    return "[" + "#" * filled + "-" * (width - filled) + f"] {done * 100:3.0f}%"


def render(table: list[LaneRow]) -> str:
    lines = [f"{'stage':<11}{'lane':<10}{'waiting':>9}{'oldest':>9}{'rate/s':>9}{'ETA':>9}{'consumers':>11}"]
    for row in table:
        rate = "-" if row.rate is None else f"{row.rate:.1f}"
        age = "-" if row.oldest_age_s is None else _duration(row.oldest_age_s)
        line = (
            f"{row.stage:<11}{row.lane:<10}{row.depth:>9,}{age:>9}{rate:>9}{_duration(row.eta_s):>9}{row.consumers:>11}"
        )
        if row.peak and (row.depth or row.peak > row.depth):
            line += "  " + bar(1 - row.depth / row.peak)
        lines.append(line)
    return "\n".join(lines)


async def sample(url: str, table: list[LaneRow], metrics_urls: tuple[str, ...]) -> None:
    counts = await queue_counts(url, [r.queue for r in table])
    metrics = await asyncio.to_thread(scrape, metrics_urls) if metrics_urls else {}
    update(table, counts, metrics, time.monotonic())
