"""Aggregator throughput and time-to-first-flag on a real RabbitMQ node (SQLite, one process).

    python bench/aggregator_throughput.py [--studies 300] [--votes 3] [--max-batch 64]

Makes, per study, image.received + prediction.made + N judgment.submitted events (shuffled, so
judgments often arrive before predictions). Peer: the same events applied straight to the store in
the consumer's batch size (no broker). Then they are published with the consumer stopped, and the
aggregator (batch consumer + outbox relay) is started alone against the full queue: events/s until
every event is in its DB, and until every triage.updated it made is confirmed by the broker.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LOAD0 = " ".join(f"{x:.2f}" for x in os.getloadavg())
sys.path.insert(0, str(ROOT))

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from harness.aggregator_events import judgment, message_id, prediction, publish, received  # noqa: E402
from harness.rabbitmq import RabbitNode  # noqa: E402
from services.aggregator.config import AggregatorSettings  # noqa: E402
from services.aggregator.models import Image, JudgmentRow, PredictionRow, Study  # noqa: E402
from services.aggregator.service import Aggregator  # noqa: E402
from services.core.broker import Broker  # noqa: E402


async def applied(agg: Aggregator, studies: int, votes: int) -> bool:
    """Every event is in the aggregator's DB (counted from the rows, not from the broker)."""
    async with agg.sessions() as s:
        preds = await s.scalar(select(func.count()).select_from(PredictionRow))
        votes_in = await s.scalar(select(func.count()).select_from(JudgmentRow))
        received_in = await s.scalar(select(func.count()).select_from(Image).where(Image.eligible.is_not(None)))
    return preds == studies and votes_in == studies * votes and received_in == studies


async def run(studies: int, votes: int, seed: int, max_batch: int) -> dict[str, float]:
    rng = random.Random(seed)
    with RabbitNode() as node, tempfile.TemporaryDirectory() as tmp:
        settings = AggregatorSettings(
            data_dir=Path(tmp) / "broker", amqp_url=node.url, secret_key="bench", max_batch=max_batch
        )
        events = []
        for i in range(studies):
            study, sop = f"1.2.826.0.1.55.{i}", f"1.2.826.0.1.55.{i}.1"
            p = rng.random()
            group = [received(sop, study), prediction(sop, p, study=study)]
            group += [judgment(sop, f"b{i}-{k}", rng.random() < p, study=study) for k in range(votes)]
            rng.shuffle(group)
            events += group
        # Peer: the same events applied straight to the store in the consumer's batch size (no broker).
        direct = Aggregator(settings.model_copy(update={"data_dir": Path(tmp) / "direct"}))
        await direct.migrate()
        t = time.perf_counter()
        for k in range(0, len(events), max_batch):
            async with direct.sessions() as s:
                await direct.store.apply_batch(s, [(e, message_id(e)) for e in events[k : k + max_batch]])
                await s.commit()
        direct_s = time.perf_counter() - t
        await direct.engine.dispose()

        publisher = await Broker(node.url).connect()
        agg = Aggregator(settings)
        await agg.migrate()
        await agg.broker.connect()
        with Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()
        ) as progress:
            pub = progress.add_task("publish (consumer stopped)", total=len(events))
            for e in events:
                if hasattr(e, "received_at") and e.HasField("received_at"):
                    e.received_at.GetCurrentTime()  # "received by ingest" = now, as it is published
                await publish(publisher, e)
                progress.advance(pub)
            # The aggregator alone against its full queue: consumer + outbox relay.
            stop = asyncio.Event()
            t0 = time.perf_counter()
            await agg.consume()
            relay = asyncio.create_task(agg.relay.run(stop))
            done = progress.add_task("applied", total=1)
            consumed_s = relayed_s = 0.0
            while True:
                now = time.perf_counter() - t0
                if not consumed_s and await applied(agg, studies, votes):
                    consumed_s = now
                    progress.update(done, completed=1)
                if consumed_s and await agg.relay.backlog() == 0:
                    relayed_s = now
                    break
                await asyncio.sleep(0.05)
        async with agg.sessions() as s:
            rows = (await s.execute(select(Study.arrived_at, Study.first_flag_at, Study.revision))).all()
        stop.set()
        relay.cancel()
        await asyncio.gather(relay, return_exceptions=True)
        await agg.broker.close()
        await publisher.close()
        await agg.engine.dispose()
    revisions = sum(r for _, _, r in rows)
    flagged = sum(1 for _, f, _ in rows if f is not None)
    print(f"{studies} studies, {len(events)} events, {revisions} triage revisions, {flagged} studies flagged")
    print(f"load average before/after: {LOAD0} / {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"direct (store.apply_batch, batches of {max_batch}, no broker): {len(events) / direct_s:.0f} events/s")
    print(f"through the broker, consumer alone on a full queue: {len(events) / consumed_s:.0f} events/s")
    print(f"  ... and every triage.updated confirmed by the broker: {len(events) / relayed_s:.0f} events/s")
    print(f"broker / direct = {direct_s / consumed_s:.2f}")
    print(
        f"as images of the e2e mix (image.received + prediction.made per image): "
        f"{len(events) / consumed_s / 2:.0f} images/s"
    )
    return {"direct_events_per_s": len(events) / direct_s, "broker_events_per_s": len(events) / consumed_s}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--studies", type=int, default=300)
    ap.add_argument("--votes", type=int, default=3)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--max-batch", type=int, default=AggregatorSettings.model_fields["max_batch"].default)
    args = ap.parse_args()
    asyncio.run(run(args.studies, args.votes, args.seed, args.max_batch))


if __name__ == "__main__":
    main()
