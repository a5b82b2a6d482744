"""Aggregator throughput and time-to-first-flag on a real RabbitMQ node (SQLite, one process).

    python bench/aggregator_throughput.py [--studies 300] [--votes 3]

Publishes, per study, image.received + prediction.made + N judgment.submitted events (shuffled, so
judgments often arrive before predictions), runs the aggregator (consumer + outbox relay) until every
study is flagged and every triage.updated is confirmed, and reports events/s and the distribution of
"received at ingest -> first flag" over studies.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from services.aggregator.app import Aggregator  # noqa: E402
from services.aggregator.config import AggregatorSettings  # noqa: E402
from services.aggregator.models import Study  # noqa: E402
from services.aggregator.store import as_utc  # noqa: E402
from services.core.broker import CONSUMERS, Broker  # noqa: E402
from services.system.rabbitmq import RabbitNode  # noqa: E402
from tests.support.aggregator_service import judgment, prediction, publish, received  # noqa: E402


async def run(studies: int, votes: int, seed: int) -> None:
    rng = random.Random(seed)
    with RabbitNode() as node, tempfile.TemporaryDirectory() as tmp:
        settings = AggregatorSettings(data_dir=Path(tmp), amqp_url=node.url, secret_key="bench")
        events = []
        for i in range(studies):
            study, sop = f"1.2.826.0.1.55.{i}", f"1.2.826.0.1.55.{i}.1"
            p = rng.random()
            group = [received(sop, study), prediction(sop, p, study=study)]
            group += [judgment(sop, f"b{i}-{k}", rng.random() < p, study=study) for k in range(votes)]
            rng.shuffle(group)
            events += group
        publisher = await Broker(node.url).connect()
        agg = Aggregator(settings)
        await agg.migrate()
        await agg.broker.connect()
        stop = asyncio.Event()
        t0 = time.perf_counter()
        await agg.broker.consume(CONSUMERS["aggregator"], agg.handle, prefetch=settings.prefetch)
        relay = asyncio.create_task(agg.relay.run(stop))
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        ) as progress:
            pub = progress.add_task("publish", total=len(events))
            for e in events:
                if hasattr(e, "received_at") and e.HasField("received_at"):
                    e.received_at.GetCurrentTime()  # "received by ingest" = now, as it is published
                await publish(publisher, e)
                progress.advance(pub)
            done = progress.add_task("flagged", total=studies)
            while True:
                async with agg.sessions() as s:
                    n = await s.scalar(select(func.count()).select_from(Study).where(Study.flag != "PENDING"))
                progress.update(done, completed=int(n or 0))
                depth = node.queue_depths().get("aggregator.events", 1)
                if n == studies and depth == 0 and await agg.relay.backlog() == 0:
                    break
                await asyncio.sleep(0.2)
        elapsed = time.perf_counter() - t0
        async with agg.sessions() as s:
            rows = (await s.execute(select(Study.arrived_at, Study.first_flag_at, Study.revision))).all()
        stop.set()
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
        await agg.broker.close()
        await publisher.close()
        await agg.engine.dispose()
    latencies = sorted((as_utc(f) - as_utc(a)).total_seconds() for a, f, _ in rows)  # type: ignore[operator]
    revisions = sum(r for _, _, r in rows)
    q = statistics.quantiles(latencies, n=100)
    print(f"{studies} studies, {len(events)} events, {revisions} triage revisions published")
    print(f"wall {elapsed:.1f} s (publishing included): {len(events) / elapsed:.0f} events/s")
    print(f"received -> first flag: median {q[49]:.2f} s, p95 {q[94]:.2f} s, max {latencies[-1]:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=300)
    ap.add_argument("--votes", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args()
    asyncio.run(run(args.studies, args.votes, args.seed))


if __name__ == "__main__":
    main()
