"""The transactional-outbox relay draining a SQLite outbox to a real RabbitMQ node (publisher confirms).

    python bench/outbox_relay.py [--n 2000] [--batch 200] [--rounds 2] [--single 50]

Peer, in the same run: the relay as it was before (ORM rows, one publish -> confirm round trip per
event, strictly serial, attribute-by-attribute marks flushed by the ORM), reimplemented below as
SerialRelay. Ours: services/core/db/outbox.OutboxRelay (the batch published with its confirms
outstanding together, one UPDATE for the confirmed rows). Each round fills the outbox with N
ImageReceived events (as ingest writes them) and times `run_once` until the backlog is 0, serial and
batched alternately; the queues are purged between runs. Prints events/s, the process's CPU ms per
event (this Python process only; RabbitMQ's own CPU is not counted) and ours / serial from each
round. `--single K`: K rounds of one event each, the two relays alternating (the trickle case:
per-round overhead).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOAD0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import delete, insert, select  # noqa: E402
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker  # noqa: E402

from harness.rabbitmq import RabbitNode  # noqa: E402
from services.core.broker import CONSUMERS, Broker  # noqa: E402
from services.core.contracts import MESSAGE_BY_ROUTING_KEY, ImageReceived, ImageRef  # noqa: E402
from services.core.db import make_engine, make_sessionmaker  # noqa: E402
from services.core.db.base import make_base  # noqa: E402
from services.core.db.outbox import OutboxMixin, OutboxRelay, outbox_row, utcnow  # noqa: E402

console = Console(width=120)
Base = make_base("relaybench")


class Outbox(OutboxMixin, Base):
    __tablename__ = "relaybench_outbox"


class SerialRelay(OutboxRelay):
    """The relay before batched confirms (the peer): one awaited publish per row, ORM marks."""

    async def run_once(self) -> int:
        sent = 0
        async with self.sessions() as session:
            rows = (
                await session.scalars(
                    select(self.model)
                    .where(self.model.published_at.is_(None))
                    .order_by(self.model.id)
                    .limit(self.batch_size)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            try:
                for row in rows:
                    message = MESSAGE_BY_ROUTING_KEY[row.routing_key].FromString(row.payload)
                    row.attempts += 1
                    await self.broker.publish(
                        row.routing_key, message, message_id=row.message_id, correlation_id=row.correlation_id
                    )
                    row.published_at = utcnow()
                    sent += 1
            except Exception as exc:
                for row in rows:
                    if row.published_at is None:
                        row.last_error = repr(exc)[:1000]
                await session.commit()
                raise
            await session.commit()
        return sent


async def fill(sessions: async_sessionmaker[AsyncSession], n: int, tag: str) -> None:
    rows = []
    now = utcnow()
    for i in range(n):
        uid = f"1.2.826.0.1.3680043.99.{tag}.{i}"
        event = ImageReceived(image=ImageRef(sop_instance_uid=uid, study_instance_uid="1.2.3", sha256="ab" * 32))
        rows.append(
            {**outbox_row(event, message_id=f"ingest:{uid}", correlation_id=uid), "created_at": now, "attempts": 0}
        )
    async with sessions() as s:
        await s.execute(delete(Outbox))
        await s.execute(insert(Outbox), rows)
        await s.commit()


async def purge(broker: Broker) -> None:
    assert broker.connection is not None
    channel = await broker.connection.channel()
    for spec in CONSUMERS.values():
        await (await channel.get_queue(spec.queue)).purge()
    await channel.close()


async def drain(relay: OutboxRelay) -> tuple[float, float, int]:
    """Wall s, CPU s of this process, rounds, until the outbox is empty."""
    rounds = 0
    w, c = time.perf_counter(), time.process_time()
    while True:
        sent = await relay.run_once()
        rounds += 1
        if sent == 0:
            break
    return time.perf_counter() - w, time.process_time() - c, rounds


async def run(n: int, batch: int, rounds: int, single: int) -> None:
    with RabbitNode() as node, tempfile.TemporaryDirectory() as tmp:
        engine = make_engine(f"sqlite+aiosqlite:///{tmp}/outbox.db")
        async with engine.begin() as conn:
            await conn.run_sync(Base.metadata.create_all)
        sessions = make_sessionmaker(engine)
        broker = await Broker(node.url).connect()
        relays = {
            "serial (before)": SerialRelay("bench", sessions, Outbox, broker, batch_size=batch),
            "batched (ours)": OutboxRelay("bench", sessions, Outbox, broker, batch_size=batch),
        }
        # warm-up: connections, statement caches
        for name, relay in relays.items():
            await fill(sessions, 50, f"w{len(name)}")
            await drain(relay)
        await purge(broker)

        table = Table(title=f"outbox relay: {n} events per run, batch {batch}, SQLite -> RabbitMQ (confirms)")
        for col in ("round", "relay", "events/s", "CPU ms/event", "rounds", "ours / serial"):
            table.add_column(col, justify="right" if col != "relay" else "left")
        ratios: list[float] = []
        cpu_ratios: list[float] = []
        for r in range(rounds):
            rate: dict[str, float] = {}
            cpu: dict[str, float] = {}
            for name, relay in relays.items():
                await fill(sessions, n, f"r{r}{name[0]}")
                wall, cpu_s, k = await drain(relay)
                assert await relay.backlog() == 0
                depth = node.queue_depths()["inference.images"]
                assert depth == n, f"{name}: {depth} messages on the queue for {n} events"
                await purge(broker)
                rate[name], cpu[name] = n / wall, 1000 * cpu_s / n
                ratio = rate[name] / rate["serial (before)"]
                table.add_row(str(r + 1), name, f"{rate[name]:,.0f}", f"{cpu[name]:.3f}", str(k), f"{ratio:.2f}×")
            ratios.append(rate["batched (ours)"] / rate["serial (before)"])
            cpu_ratios.append(cpu["serial (before)"] / cpu["batched (ours)"])
        console.print(table)

        if single:
            trickle = Table(title=f"one event per round ({single} rounds): ms per round (wall), CPU ms per event")
            for col in ("relay", "wall ms p50", "CPU ms/event"):
                trickle.add_column(col, justify="right" if col != "relay" else "left")
            walls: dict[str, list[float]] = {name: [] for name in relays}
            cpus: dict[str, list[float]] = {name: [] for name in relays}
            for i in range(single):  # the two relays alternate, one event each time
                for name, relay in relays.items():
                    await fill(sessions, 1, f"s{name[0]}{i}")
                    w, c = time.perf_counter(), time.process_time()
                    assert await relay.run_once() == 1
                    walls[name].append(1000 * (time.perf_counter() - w))
                    cpus[name].append(1000 * (time.process_time() - c))
            for name in relays:
                trickle.add_row(name, f"{statistics.median(walls[name]):.2f}", f"{statistics.mean(cpus[name]):.2f}")
            await purge(broker)
            console.print(trickle)

        await broker.close()
        await engine.dispose()
    console.print(f"load average before/after: {LOAD0} / {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    console.print(
        f"[bold]events/s ours / serial: {', '.join(f'{x:.2f}×' for x in ratios)} (per round); "
        f"CPU per event serial / ours: {', '.join(f'{x:.2f}×' for x in cpu_ratios)}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=2000, help="events per run")
    ap.add_argument("--batch", type=int, default=200, help="relay batch size (the services' default)")
    ap.add_argument("--rounds", type=int, default=2, help="runs of each relay, alternating")
    ap.add_argument("--single", type=int, default=50, help="rounds of one event each (0: skip)")
    args = ap.parse_args()
    asyncio.run(run(args.n, args.batch, args.rounds, args.single))


if __name__ == "__main__":
    main()
