"""What several replicas of a service share is PostgreSQL, so the database (not a lock inside one
process) must keep them correct:

- migrations: replicas that start together on an empty database migrate it once (an advisory
  lock per service), none of them fails;
- outbox relays: replicas draining one outbox publish each event once;
- the aggregator: replicas that see the same new study at once create it once and apply its
  events one at a time (INSERT ... ON CONFLICT DO NOTHING + SELECT ... FOR UPDATE), with no
  conflict to retry, and the audit trail's revisions stay 1..n.

Each "replica" here has its own engine (its own connections), as separate processes would.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import select, text

from harness.queues import take
from harness.rabbitmq import RabbitNode
from services.aggregator.config import AggregatorSettings
from services.aggregator.models import Base as AggregatorBase
from services.aggregator.models import Image, PredictionRow, Study, TriageHistory
from services.aggregator.service import Aggregator
from services.core.broker import Broker
from services.core.contracts import ImageReceived, ImageRef
from services.core.db import make_engine, make_sessionmaker, upgrade
from services.core.db.outbox import OutboxRelay, add_event
from services.ingest.models import Base as IngestBase
from services.ingest.models import Outbox as IngestOutbox
from tests.support.aggregator_service import judgment, message_id, prediction, received, write_test_policy
from tests.support.postgres import PostgresServer, postgres  # noqa: F401

pytestmark = pytest.mark.postgres


async def fresh_database(server: PostgresServer) -> str:
    name = f"pt_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"postgresql+asyncpg://postgres@127.0.0.1:{server.port}/{name}"


MIGRATE_ALL = """
import asyncio, sys
from services.core.db import make_engine, upgrade
from services.aggregator.models import Base as A
from services.ingest.models import Base as I
from services.labeling.models import Base as L

async def main(url):
    engine = make_engine(url)
    try:
        for svc, base in (("ingest", I), ("labeling", L), ("aggregator", A)):
            await upgrade(engine, svc, base.metadata)
    finally:
        await engine.dispose()

asyncio.run(main(sys.argv[1]))
"""


async def test_migrations_run_once_when_replicas_start_together(postgres: PostgresServer) -> None:  # noqa: F811
    url = await fresh_database(postgres)
    # four replicas (processes: Alembic's context is per process) on an empty database, all at once
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", MIGRATE_ALL, url, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
        )
        for _ in range(4)
    ]
    outputs = [(await p.communicate())[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], "\n".join(outputs)[-3000:]
    engine = make_engine(url)
    try:
        async with engine.connect() as conn:
            for svc in ("ingest", "labeling", "aggregator"):
                versions = (await conn.execute(text(f"SELECT version_num FROM alembic_version_{svc}"))).all()
                assert len(versions) == 1, (svc, versions)
            tables = (
                await conn.execute(text("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'aggregator_%'"))
            ).scalar_one()
        assert tables == len(AggregatorBase.metadata.tables)
    finally:
        await engine.dispose()


async def replica(url: str, tmp_path: Path) -> Aggregator:
    settings = AggregatorSettings(data_dir=tmp_path, policy_file=write_test_policy(tmp_path / "p.yaml"), secret_key="x")
    agg = Aggregator(settings, engine=make_engine(url))
    await agg.migrate()
    return agg


async def apply_once(agg: Aggregator, msg: object) -> None:
    """Exactly what the consumer does for one delivery, minus the in-process lock, and no retry:
    a DB conflict here would be an exception (the broker would have to retry it)."""
    async with agg.sessions() as s:
        change = await agg.store.apply(s, msg, trigger=message_id(msg))
        await s.commit()
    agg.after_commit(change)


async def test_aggregator_replicas_create_and_update_one_study_without_conflicts(
    postgres: PostgresServer,  # noqa: F811
    tmp_path: Path,
) -> None:
    url = await fresh_database(postgres)
    replicas = [await replica(url, tmp_path) for _ in range(4)]
    try:
        for _round in range(3):  # three new studies, each hit by all replicas at the same moment
            study = f"2.25.{uuid.uuid4().int}"
            sops = [f"{study}.{i}" for i in range(4)]
            events: list[object] = [received(s, study) for s in sops]
            events += [prediction(s, 0.9, study=study) for s in sops]
            events += [judgment(s, f"{s}-j{k}", k % 2 == 0, study=study) for s in sops for k in range(2)]
            events += events[:6]  # redeliveries / duplicates from another replica's relay
            results = await asyncio.gather(
                *(apply_once(replicas[i % len(replicas)], e) for i, e in enumerate(events)), return_exceptions=True
            )
            assert [r for r in results if isinstance(r, BaseException)] == []
            async with replicas[0].sessions() as s:
                rows = (await s.scalars(select(Study).where(Study.study_uid == study))).all()
                revs = (await s.scalars(select(TriageHistory.revision).where(TriageHistory.study_uid == study))).all()
                images = (await s.scalars(select(Image.sop_uid).where(Image.study_uid == study))).all()
                preds = (await s.scalars(select(PredictionRow.sop_uid).where(PredictionRow.sop_uid.in_(sops)))).all()
            assert len(rows) == 1 and rows[0].flag != "PENDING"
            assert rows[0].human_judgments == 8
            assert sorted(revs) == list(range(1, rows[0].revision + 1))
            assert sorted(images) == sorted(sops) and sorted(preds) == sorted(sops)
            # the result is what one replica alone computes from the same evidence
            async with replicas[1].sessions() as s:
                study_row = await s.get(Study, study)
                assert study_row is not None
                assert await replicas[1].store.recompute(s, study_row) is None
    finally:
        for agg in replicas:
            await agg.engine.dispose()


async def test_outbox_relays_of_three_replicas_publish_each_event_once(
    postgres: PostgresServer,  # noqa: F811
    rabbit: RabbitNode,
) -> None:
    """Three relays (three replicas' engines and broker connections) drain one outbox at once:
    `FOR UPDATE SKIP LOCKED` gives each pending row to one of them, so every event reaches the
    queue exactly once and the work is shared."""
    url = await fresh_database(postgres)
    vhost = f"pt-relays-{uuid.uuid4().hex[:8]}"
    rabbit.ctl("add_vhost", vhost)
    rabbit.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    amqp = f"amqp://guest:guest@127.0.0.1:{rabbit.port}/{vhost}"
    engines = [make_engine(url) for _ in range(3)]
    brokers: list[Broker] = []
    n = 150
    try:
        await upgrade(engines[0], "ingest", IngestBase.metadata)
        sessions = [make_sessionmaker(e) for e in engines]
        async with sessions[0]() as s:
            for i in range(n):
                event = ImageReceived(image=ImageRef(sop_instance_uid=f"9.{i}", sha256="ab" * 32))
                add_event(s, IngestOutbox, event, message_id=f"relay-test:{i}", correlation_id=f"9.{i}")
            await s.commit()
        brokers = [await Broker(amqp).connect() for _ in range(3)]
        relays = [OutboxRelay("ingest", sessions[i], IngestOutbox, brokers[i], batch_size=10) for i in range(3)]
        published = [0, 0, 0]

        async def drain(i: int) -> None:
            while await relays[i].backlog():
                published[i] += await relays[i].run_once()
                await asyncio.sleep(0)  # yield: the three relays take turns (not a wait for anything)

        await asyncio.gather(*(drain(i) for i in range(3)))
        assert sum(published) == n and sum(1 for p in published if p) >= 2, published
        taken = await take(brokers[0].connection, "inference.images")  # type: ignore[arg-type]
        uids = [ImageReceived.FromString(msg.body).image.sop_instance_uid for msg in taken]
        assert sorted(uids) == sorted(f"9.{i}" for i in range(n)), "each event published exactly once"
    finally:
        for b in brokers:
            await b.close()
        for e in engines:
            await e.dispose()
        rabbit.ctl("delete_vhost", vhost, check=False)
