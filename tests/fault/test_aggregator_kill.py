"""kill -9 of the running aggregator in the middle of a run: after a restart every study has exactly
one current result, the audit trail has no gaps, nothing is published twice with different content,
and every revision reached triage.updated subscribers (real RabbitMQ, real service process)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from collections import defaultdict
from pathlib import Path

import pytest

from harness.processes import CLI, TestProcess
from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.core.broker import Broker
from services.core.net import free_port
from tests.support.aggregator_service import (  # noqa: F401
    TriageTap,
    judgment,
    prediction,
    publish,
    received,
    triage_tap_fixture,
    write_test_policy,
)

N_STUDIES = 120
EXPECTED = {0: "URGENT", 1: "LIKELY_HEALTHY", 2: "UNCERTAIN"}


def events(i: int) -> list[object]:
    study, sop = f"1.2.826.0.1.77.{i}", f"1.2.826.0.1.77.{i}.1"
    kind = i % 3
    p = {0: 0.97, 1: 0.03, 2: 0.5}[kind]
    out: list[object] = [received(sop, study), prediction(sop, p, study=study)]
    if kind != 2:
        out += [judgment(sop, f"k{i}-{n}", kind == 0, study=study) for n in range(2)]
    return out


def start(env: dict[str, str], log: Path) -> TestProcess:
    return TestProcess("aggregator", [*CLI, "aggregator"], log, env=env).launch()


def query(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:  # tables not created yet
        return []
    finally:
        conn.close()


@pytest.mark.timeout(600)
async def test_kill_9_mid_run_loses_and_duplicates_nothing(
    rabbit: RabbitNode, broker: Broker, triage_tap: TriageTap, tmp_path: Path
) -> None:
    env = dict(os.environ)
    env.update(
        PT_DATA_DIR=str(tmp_path),
        PT_AMQP_URL=rabbit.url,
        PT_AGGREGATOR_HTTP_PORT=str(free_port()),
        PT_AGGREGATOR_POLICY_FILE=str(write_test_policy(tmp_path / "policy.yaml")),
        PT_SECRET_KEY="x",
    )
    db, log = tmp_path / "aggregator.db", tmp_path / "aggregator.log"
    proc = start(env, log)
    try:
        for i in range(N_STUDIES):
            for msg in events(i):
                await publish(broker, msg)

        async def some_done() -> bool:
            rows = await asyncio.to_thread(query, db, "SELECT count(*) FROM aggregator_triage_history")
            return bool(rows) and rows[0][0] >= 40

        await eventually_async(some_done, timeout=180, what="the aggregator to be mid-run")
        proc.kill9()
        done_before = (await asyncio.to_thread(query, db, "SELECT count(*) FROM aggregator_triage_history"))[0][0]
        assert done_before < N_STUDIES * 4, "killed too late to test anything"
        # Redeliver a slice of events as duplicates too (a producer's outbox re-send after its own crash).
        for i in range(0, N_STUDIES, 7):
            for msg in events(i):
                await publish(broker, msg)
        proc = start(env, log)

        async def settled() -> bool:
            depth = (await asyncio.to_thread(rabbit.queue_depths)).get("aggregator.events", 1)
            if depth:
                return False
            flagged = await asyncio.to_thread(
                query, db, "SELECT count(*) FROM aggregator_studies WHERE flag != 'PENDING'"
            )
            backlog = await asyncio.to_thread(
                query, db, "SELECT count(*) FROM aggregator_outbox WHERE published_at IS NULL"
            )
            return flagged[0][0] == N_STUDIES and backlog[0][0] == 0

        await eventually_async(settled, timeout=300, what="every study flagged and every event published")
    finally:
        proc.stop(30)

    studies = dict(query(db, "SELECT study_uid, flag FROM aggregator_studies"))
    assert len(studies) == N_STUDIES
    for i in range(N_STUDIES):
        assert studies[f"1.2.826.0.1.77.{i}"] == EXPECTED[i % 3], i
    revisions: dict[str, list[int]] = defaultdict(list)
    for study, rev in query(db, "SELECT study_uid, revision FROM aggregator_triage_history"):
        revisions[study].append(rev)
    current = dict(query(db, "SELECT study_uid, revision FROM aggregator_studies"))
    for study, revs in revisions.items():
        assert sorted(revs) == list(range(1, current[study] + 1)), study  # no gaps, no duplicates
    assert query(db, "SELECT count(*) FROM aggregator_judgments")[0][0] == 2 * sum(
        1 for i in range(N_STUDIES) if i % 3 != 2
    )
    assert query(db, "SELECT count(*) FROM aggregator_predictions")[0][0] == N_STUDIES

    async def all_published() -> bool:
        got = {(e.study_instance_uid, e.revision) for e in triage_tap.events}
        return all((s, r) in got for s, revs in revisions.items() for r in revs)

    await eventually_async(all_published, timeout=60, what="every revision on triage.updated")
    # a revision re-sent after the crash carries the same content (at-least-once, idempotent)
    by_key: dict[tuple[str, int], set[int]] = defaultdict(set)
    for e in triage_tap.events:
        by_key[(e.study_instance_uid, e.revision)].add(e.flag)
    assert all(len(flags) == 1 for flags in by_key.values())
