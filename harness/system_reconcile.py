"""Account for every image after a system run: what the sender saw acknowledged, what ingest
stored (DB + file + sha256), what the broker still holds (queues, dead letters with reasons), and
what each consumer made of it (one prediction, one labeling task, one current triage result).

Reads the services' SQLite files read-only (a service is never imported), and the broker through
AMQP (dead-lettered messages are looked at and put back) and rabbitmqctl.
"""

from __future__ import annotations

import asyncio
import hashlib
import sqlite3
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

import aio_pika

from harness.queues import take
from harness.system_harness import SystemHarness
from harness.wait import NotYet, eventually
from services.core.broker import CONSUMERS

PENDING_FLAGS = {None, "", "PENDING"}


def _query(db: Path, sql: str) -> list[tuple]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return []
        raise
    finally:
        conn.close()


class DbReader:
    """Read-only SQL against a service's tables: its SQLite file, or the shared PostgreSQL."""

    def __init__(self, system: SystemHarness) -> None:
        self.data_dir = system.data_dir
        url = system.config.common_env().get("PT_DATABASE_URL", "")
        self.pg_dsn = url.replace("postgresql+asyncpg://", "postgresql://", 1) if url else ""

    def query(self, service: str, sql: str) -> list[tuple]:
        if not self.pg_dsn:
            return _query(self.data_dir / f"{service}.db", sql)
        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, self._pg(sql)).result()

    async def _pg(self, sql: str) -> list[tuple]:
        import asyncpg

        conn = await asyncpg.connect(self.pg_dsn, timeout=30)
        try:
            return [tuple(r) for r in await conn.fetch(sql)]
        except asyncpg.UndefinedTableError:
            return []
        finally:
            await conn.close()


async def _peek_dead_letters(amqp_url: str) -> dict[str, list[tuple[str, str]]]:
    """(correlation id, reason) of every dead-lettered message; they stay in their queues."""
    out: dict[str, list[tuple[str, str]]] = {}
    connection = await aio_pika.connect(amqp_url, timeout=30)
    try:
        for spec in CONSUMERS.values():
            entries: list[tuple[str, str]] = []
            for message in await take(connection, spec.dlq, remove=False):
                headers = dict(message.headers or {})
                reason = headers.get("x-death-reason") or headers.get("x-first-death-reason") or "(no reason)"
                entries.append((str(message.correlation_id or headers.get("x-correlation-id") or ""), str(reason)))
            out[spec.dlq] = entries
    finally:
        await connection.close()
    return out


def _file_path(uri: str) -> Path:
    parsed = urlparse(uri)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else Path(uri)


@dataclass
class Reconciliation:
    acked: set[str]
    ingest_instances: dict[str, tuple[str, str]] = field(default_factory=dict)  # sop -> (sha256, uri)
    ingest_rows: int = 0
    store_files: int = 0
    store_missing: list[str] = field(default_factory=list)
    store_bad_hash: list[str] = field(default_factory=list)
    outbox_backlog: dict[str, int] = field(default_factory=dict)
    queue_depths: dict[str, int] = field(default_factory=dict)
    dead_letters: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    predictions: Counter[str] = field(default_factory=Counter)
    labeling_tasks: Counter[str] = field(default_factory=Counter)
    labeling_skipped: Counter[str] = field(default_factory=Counter)  # refused by the input gate: no task
    image_flags: dict[str, str | None] = field(default_factory=dict)
    image_study: dict[str, str] = field(default_factory=dict)
    study_flags: dict[str, str | None] = field(default_factory=dict)
    study_rows: Counter[str] = field(default_factory=Counter)
    history_gaps: list[str] = field(default_factory=list)

    @property
    def dead_lettered(self) -> dict[str, str]:
        """sop uid -> reason, over every dead-letter queue."""
        return {cid: reason for entries in self.dead_letters.values() for cid, reason in entries if cid}

    def flagged(self) -> set[str]:
        return {sop for sop, flag in self.image_flags.items() if flag not in PENDING_FLAGS}

    def problems(self, check_labeling: bool = True) -> list[str]:
        p: list[str] = []
        dead = self.dead_lettered
        lost = sorted(self.acked - set(self.ingest_instances))
        if lost:
            p.append(f"{len(lost)} C-STORE-acknowledged image(s) missing from ingest's DB: {lost[:3]}")
        if self.ingest_rows != len(self.ingest_instances):
            p.append(f"ingest holds {self.ingest_rows} rows for {len(self.ingest_instances)} SOP instances")
        if self.store_missing:
            p.append(f"{len(self.store_missing)} stored instance(s) have no file: {self.store_missing[:3]}")
        if self.store_bad_hash:
            p.append(f"{len(self.store_bad_hash)} file(s) do not match their sha256: {self.store_bad_hash[:3]}")
        for svc, n in self.outbox_backlog.items():
            if n:
                p.append(f"{svc} outbox still holds {n} unpublished event(s)")
        busy = {q: n for q, n in self.queue_depths.items() if n and not q.endswith(".dlq")}
        if busy:
            p.append(f"messages still queued: {busy}")
        for sop in sorted(self.acked):
            if sop in dead:
                continue
            if self.image_flags.get(sop) in PENDING_FLAGS:
                p.append(f"{sop}: no current triage result (flag {self.image_flags.get(sop)!r})")
            if self.predictions[sop] != 1:
                p.append(f"{sop}: {self.predictions[sop]} predictions (want exactly 1)")
            if check_labeling and self.labeling_tasks[sop] + self.labeling_skipped[sop] != 1:
                p.append(
                    f"{sop}: {self.labeling_tasks[sop]} labeling tasks, {self.labeling_skipped[sop]} skip records"
                    " (want exactly 1 of either)"
                )
        for study in {self.image_study[s] for s in self.acked if s in self.image_study}:
            if self.study_rows[study] != 1 or self.study_flags.get(study) in PENDING_FLAGS:
                p.append(f"study {study}: {self.study_rows[study]} rows, flag {self.study_flags.get(study)!r}")
        dup_pred = [s for s, n in self.predictions.items() if n > 1]
        dup_task = [s for s, n in self.labeling_tasks.items() if n > 1]
        if dup_pred or dup_task:
            p.append(f"duplicates: predictions {dup_pred[:3]}, tasks {dup_task[:3]}")
        if self.history_gaps:
            p.append(f"triage history revisions not 1..n for {self.history_gaps[:3]}")
        return p

    def table(self) -> str:
        dead = self.dead_lettered
        acked_dead = sum(1 for s in self.acked if s in dead)
        rows = [
            ("C-STORE acknowledged (sender)", len(self.acked)),
            ("ingest: SOP instances in DB", len(self.ingest_instances)),
            ("ingest: acknowledged and in DB", len(self.acked & set(self.ingest_instances))),
            ("store: files present, sha256 ok", self.store_files - len(self.store_bad_hash)),
            ("outbox backlog (all services)", sum(self.outbox_backlog.values())),
            ("broker: messages in work/retry queues",
             sum(n for q, n in self.queue_depths.items() if not q.endswith(".dlq"))),
            ("broker: dead-lettered (with reason)", sum(len(v) for v in self.dead_letters.values())),
            ("inference: predictions (distinct images)", len(self.predictions)),
            ("labeling: tasks (distinct images)", len(self.labeling_tasks)),
            ("labeling: refused by the input gate (no task)", len(self.labeling_skipped)),
            ("aggregator: images with a current flag", len(self.flagged())),
            ("aggregator: acknowledged images flagged", len(self.acked & self.flagged())),
            ("acknowledged images dead-lettered", acked_dead),
            ("aggregator: studies (one row each)", len(self.study_rows)),
        ]  # fmt: skip
        width = max(len(r[0]) for r in rows)
        lines = ["reconciliation", "-" * (width + 10)]
        lines += [f"{name:<{width}}  {value:>7}" for name, value in rows]
        flags = Counter(f for f in self.study_flags.values())
        lines.append(f"{'study flags':<{width}}  {dict(flags)}")
        for queue, entries in self.dead_letters.items():
            for cid, reason in entries[:5]:
                lines.append(f"  DLQ {queue}: {cid[:40]}... {reason[:100]}")
        problems = self.problems()
        lines.append("OK: every acknowledged image accounted for" if not problems else "PROBLEMS:")
        lines += [f"  - {x}" for x in problems[:20]]
        return "\n".join(lines)


def reconcile(system: SystemHarness, acked: set[str], verify_hashes: bool = True) -> Reconciliation:
    db = DbReader(system)
    r = Reconciliation(acked=set(acked))
    rows = db.query("ingest", "SELECT sop_instance_uid, sha256, storage_uri FROM ingest_instances")
    r.ingest_rows = len(rows)
    r.ingest_instances = {sop: (sha, uri) for sop, sha, uri in rows}
    for sop, (sha, uri) in r.ingest_instances.items():
        path = _file_path(uri)
        if not path.is_file():
            r.store_missing.append(sop)
            continue
        r.store_files += 1
        if verify_hashes and hashlib.sha256(path.read_bytes()).hexdigest() != sha:
            r.store_bad_hash.append(sop)
    for svc in ("ingest", "labeling", "aggregator", "inference"):
        n = db.query(svc, f"SELECT count(*) FROM {svc}_outbox WHERE published_at IS NULL")
        if n:
            r.outbox_backlog[svc] = int(n[0][0])
    r.queue_depths = system.queue_depths()
    # in a thread of its own: Playwright's sync API keeps an event loop in this one
    with ThreadPoolExecutor(1) as pool:
        r.dead_letters = pool.submit(asyncio.run, _peek_dead_letters(system.amqp_url)).result()
    r.predictions = Counter(s for (s,) in db.query("aggregator", "SELECT sop_uid FROM aggregator_predictions"))
    r.labeling_tasks = Counter(
        s for (s,) in db.query("labeling", "SELECT sop_instance_uid FROM labeling_tasks WHERE kind = 'work'")
    )
    skipped = db.query("labeling", "SELECT sop_instance_uid FROM labeling_skipped_images")
    r.labeling_skipped = Counter(s for (s,) in skipped)
    for sop, study, flag in db.query("aggregator", "SELECT sop_uid, study_uid, flag FROM aggregator_images"):
        r.image_flags[sop] = flag
        r.image_study[sop] = study
    for study, flag in db.query("aggregator", "SELECT study_uid, flag FROM aggregator_studies"):
        r.study_flags[study] = flag
        r.study_rows[study] += 1
    revisions: dict[str, list[int]] = {}
    for study, rev in db.query("aggregator", "SELECT study_uid, revision FROM aggregator_triage_history"):
        revisions.setdefault(study, []).append(int(rev))
    r.history_gaps = [s for s, revs in revisions.items() if sorted(revs) != list(range(1, len(revs) + 1))]
    return r


def wait_reconciled(
    system: SystemHarness, acked: set[str], timeout: float = 300.0, check_labeling: bool = True
) -> Reconciliation:
    """Poll until every acknowledged image is accounted for (or the timeout), then print the table."""

    def accounted() -> Reconciliation | None:
        r = reconcile(system, acked, verify_hashes=False)
        if r.problems(check_labeling):
            return None
        # Settled without hashing; confirm with the full check. Late events (a vote that lands
        # between the two looks, with its outbox row not yet relayed) mean: keep polling.
        r = reconcile(system, acked, verify_hashes=True)
        return None if r.problems(check_labeling) else r

    try:
        r = eventually(accounted, timeout, 2.0, what="every acknowledged image accounted for")
    except NotYet:  # the caller asserts on the table's problems
        r = reconcile(system, acked, verify_hashes=True)
    print(r.table())
    return r
