"""Committing stored instances: rows + outbox event in one transaction, with group commit.

The transaction itself is written once, as plain SQLAlchemy Core on a synchronous Connection
(`record_batch`): the studies (upsert, image count), the series (upsert), the instances and their
ImageReceived outbox rows, in a fixed number of statements per batch (executemany for the rows).
Whatever arrived from concurrent associations while the previous commit ran goes into the next
transaction together (one fsync for all of them); each C-STORE is answered only after the commit
holding its rows. A failing batch is retried one instance per transaction, so
one bad row never fails the others. Two committers run it:

- ThreadCommitter (SQLite, the default): a dedicated writer thread with a synchronous engine on the
  same database file. The association threads hand it their instance and wait for the commit, so
  the hot path never crosses the event loop (SQLite has a single writer anyway).
- LoopCommitter (PostgreSQL / asyncpg, which has no synchronous driver): the same function through
  AsyncConnection.run_sync on the service's event loop.

A duplicate SOP instance (a retry, a second sender) is found inside the transaction: no row, no event.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import threading
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from sqlalchemy import Connection, Engine, bindparam, create_engine, event, insert, select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.contracts import ImageReceived, ImageRef
from services.core.db.engine import sqlite_pragmas
from services.core.db.outbox import outbox_row
from services.ingest.models import Instance, Outbox, Series, Study
from services.ingest.records import message_id, to_timestamp
from services.ingest.store import StoredFile
from services.ingest.validate import Decision

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Conflict:
    """The SOP Instance UID is stored already with other content: refused, the stored file kept."""

    stored_sha256: str


@dataclass
class Pending:
    decision: Decision
    stored: StoredFile
    calling_ae: str
    future: concurrent.futures.Future[ImageReceived | Conflict | None] = field(
        default_factory=concurrent.futures.Future
    )


_STATEMENTS: dict[str, dict[str, Any]] = {}


def _statements(conn: Connection) -> dict[str, Any]:
    """The statements of record_batch, built once per dialect with bind parameters: SQLAlchemy then
    reuses their compiled form instead of building and compiling new statements per batch."""
    name = conn.dialect.name
    found = _STATEMENTS.get(name)
    if found is not None:
        return found
    ins = pg_insert if name == "postgresql" else sqlite_insert
    study = ins(Study).values(
        study_instance_uid=bindparam("uid"), image_count=bindparam("count"), created_at=bindparam("now")
    )
    study = study.on_conflict_do_update(
        index_elements=[Study.study_instance_uid], set_={"image_count": Study.image_count + study.excluded.image_count}
    ).returning(Study.id, Study.image_count)
    series = ins(Series).values(
        series_instance_uid=bindparam("uid"),
        study_id=bindparam("study_id"),
        modality=bindparam("modality"),
        created_at=bindparam("now"),
    )
    series = series.on_conflict_do_update(  # a no-op update, so that RETURNING gives the existing id too
        index_elements=[Series.series_instance_uid], set_={"series_instance_uid": series.excluded.series_instance_uid}
    ).returning(Series.id)
    built = {
        "stored": select(Instance.sop_instance_uid, Instance.sha256).where(
            Instance.sop_instance_uid.in_(bindparam("uids", expanding=True))
        ),
        "study": study,
        "series": series,
        "instance": insert(Instance),
        "outbox": insert(Outbox),
    }
    _STATEMENTS[name] = built
    return built


def _instance_row(
    decision: Decision, stored: StoredFile, calling_ae: str, series_id: int, now: datetime
) -> dict[str, Any]:
    return dict(
        sop_instance_uid=decision.sop_instance_uid,
        series_id=series_id,
        sop_class_uid=decision.sop_class_uid,
        transfer_syntax_uid=decision.transfer_syntax_uid,
        sha256=stored.sha256,
        storage_uri=stored.uri,
        size_bytes=stored.size,
        modality=decision.modality,
        body_part_examined=decision.body_part_examined,
        view_position=decision.view_position,
        rows=decision.rows,
        columns=decision.columns,
        photometric_interpretation=decision.photometric_interpretation,
        patient_age_years=decision.patient_age_years,
        triage_eligible=decision.triage_eligible,
        not_triaged_reason=decision.not_triaged_reason,
        outside_intended_use=decision.outside_intended_use,
        calling_ae_title=calling_ae,
        received_at=now,
    )


def _event(decision: Decision, stored: StoredFile, calling_ae: str, study_count: int, now: datetime) -> ImageReceived:
    return ImageReceived(
        image=ImageRef(
            study_instance_uid=decision.study_instance_uid,
            series_instance_uid=decision.series_instance_uid,
            sop_instance_uid=decision.sop_instance_uid,
            sop_class_uid=decision.sop_class_uid,
            storage_uri=stored.uri,
            sha256=stored.sha256,
            lane=decision.lane,
        ),
        modality=decision.modality,
        body_part_examined=decision.body_part_examined,
        view_position=decision.view_position,
        transfer_syntax_uid=decision.transfer_syntax_uid,
        rows=decision.rows,
        columns=decision.columns,
        photometric_interpretation=decision.photometric_interpretation,
        patient_age_years=decision.patient_age_years,
        triage_eligible=decision.triage_eligible,
        outside_intended_use=decision.outside_intended_use,
        intended_use_note=decision.intended_use_note,
        calling_ae_title=calling_ae,
        received_at=to_timestamp(now),
        study_image_count=study_count,
        not_triaged_reason=decision.not_triaged_reason,
        lane_reason=decision.lane_reason,
    )


def record_batch(
    conn: Connection, items: list[tuple[Decision, StoredFile, str]]
) -> list[ImageReceived | Conflict | None]:
    """Write a batch of instances and their events in the connection's transaction, in a fixed
    number of statements whatever the batch size: which instances are stored already (one query),
    one upsert per distinct study (its image count grows by the batch's new images) and per distinct
    series, then every instance row and every outbox row (two executemany inserts). Returns, per
    item and in order, its event, None when the instance was stored already with the same content
    (before, or earlier in this batch: the same instance from two worker processes), or a Conflict
    when its SOP Instance UID is stored with other content (docs/dicom-conformance.md: refused)."""
    if not items:
        return []
    now = datetime.now(UTC)
    st = _statements(conn)
    uids = list(dict.fromkeys(d.sop_instance_uid for d, _, _ in items))
    known: dict[str, str] = {row.sop_instance_uid: row.sha256 for row in conn.execute(st["stored"], {"uids": uids})}
    new: list[int] = []  # indexes of the items that are written
    results: list[ImageReceived | Conflict | None] = [None] * len(items)
    for i, (decision, stored, _) in enumerate(items):
        uid = decision.sop_instance_uid
        if uid not in known:
            known[uid] = stored.sha256
            new.append(i)
        elif known[uid] != stored.sha256:
            results[i] = Conflict(known[uid])
    if not new:
        return results
    study_ids: dict[str, int] = {}
    counts: dict[str, int] = {}  # study uid -> its image count so far (before this batch, then running)
    for uid, added in Counter(items[i][0].study_instance_uid for i in new).items():
        row = conn.execute(st["study"], {"uid": uid, "count": added, "now": now}).one()
        study_ids[uid], counts[uid] = int(row.id), int(row.image_count) - added
    series_ids: dict[str, int] = {}
    instance_rows, outbox_rows = [], []
    for i in new:
        decision, stored, calling_ae = items[i]
        study, series, uid = decision.study_instance_uid, decision.series_instance_uid, decision.sop_instance_uid
        if series not in series_ids:
            params = {"uid": series, "study_id": study_ids[study], "modality": decision.modality, "now": now}
            series_ids[series] = int(conn.execute(st["series"], params).scalar_one())
        counts[study] += 1
        received = _event(decision, stored, calling_ae, counts[study], now)
        instance_rows.append(_instance_row(decision, stored, calling_ae, series_ids[series], now))
        # the same outbox row add_event writes, inserted with Core (no ORM session on this thread)
        row = outbox_row(received, message_id=message_id(uid), correlation_id=uid)
        outbox_rows.append({**row, "created_at": now, "attempts": 0})
        results[i] = received
    conn.execute(st["instance"], instance_rows)
    conn.execute(st["outbox"], outbox_rows)
    return results


def _is_stored(conn: Connection, uid: str) -> bool:
    return conn.execute(_statements(conn)["stored"], {"uids": [uid]}).first() is not None


class Committer(Protocol):
    """What the SCP commits through: ThreadCommitter (SQLite), LoopCommitter (PostgreSQL) or, in a
    worker process, workers.RemoteCommitter (the first process commits)."""

    def start(self) -> None: ...

    def submit(self, decision: Decision, stored: StoredFile, calling_ae: str) -> concurrent.futures.Future[Any]: ...

    async def stop(self) -> None: ...


class _Committer:
    """Shared batching logic; subclasses say how a transaction runs."""

    max_batch = 64

    def _transaction(self, items: list[Pending]) -> list[ImageReceived | Conflict | None]:
        raise NotImplementedError

    def _stored(self, uid: str) -> bool:
        raise NotImplementedError

    def _commit(self, batch: list[Pending]) -> None:
        """Run a batch (the caller marked the futures running); settle every future."""
        try:
            results = self._transaction(batch)
        except Exception as exc:
            if len(batch) == 1:
                self._fail(batch[0], exc)
                return
            log.warning("group commit failed, retrying one by one", extra={"error": repr(exc)[:300]})
            for item in batch:
                try:
                    item.future.set_result(self._transaction([item])[0])
                except Exception as exc1:
                    self._fail(item, exc1)
            return
        for item, result in zip(batch, results, strict=True):
            item.future.set_result(result)

    def _fail(self, item: Pending, exc: Exception) -> None:
        if isinstance(exc, IntegrityError):
            # another ingest process (shared database) stored the same instance first: it owns the event
            with contextlib.suppress(Exception):
                if self._stored(item.decision.sop_instance_uid):
                    item.future.set_result(None)
                    return
        item.future.set_exception(exc)


def _driver_autocommit(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.isolation_level = None  # pysqlite emits no BEGIN of its own; _begin_immediate does


def _begin_immediate(conn: Connection) -> None:
    conn.exec_driver_sql("BEGIN IMMEDIATE")


class ThreadCommitter(_Committer):
    """Group commit on a writer thread with a synchronous SQLite engine."""

    def __init__(self, sqlite_url: str) -> None:
        url = make_url(sqlite_url).set(drivername="sqlite")
        self.engine: Engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
        event.listen(self.engine, "connect", sqlite_pragmas)
        # BEGIN IMMEDIATE (SQLAlchemy's pysqlite recipe): a batch takes the write lock before it reads
        # which instances are stored, so another writer of the same file (the relay, a refusal
        # recorded by a worker process) makes it wait at BEGIN instead of failing it mid-batch.
        event.listen(self.engine, "connect", _driver_autocommit)
        event.listen(self.engine, "begin", _begin_immediate)
        self._queue: queue.Queue[Pending | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._conn: Connection | None = None  # the writer thread's own, kept open between batches

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ingest-commit", daemon=True)
        self._thread.start()

    def submit(self, decision: Decision, stored: StoredFile, calling_ae: str) -> concurrent.futures.Future[Any]:
        item = Pending(decision, stored, calling_ae)
        self._queue.put(item)
        return item.future

    def _transaction(self, items: list[Pending]) -> list[ImageReceived | Conflict | None]:
        # One connection for the thread's life: no pool check-out and reset (a ROLLBACK) per batch.
        # After any failure it is closed, so the next batch starts on a fresh one.
        if self._conn is None:
            self._conn = self.engine.connect()
        try:
            with self._conn.begin():
                return record_batch(self._conn, [(p.decision, p.stored, p.calling_ae) for p in items])
        except BaseException:
            self._close_connection()
            raise

    def _close_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with contextlib.suppress(Exception):
                conn.close()

    def _stored(self, uid: str) -> bool:
        with self.engine.connect() as conn:
            return _is_stored(conn, uid)

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            # skip instances whose sender already gave up (timed out and was answered 0xA700)
            batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if batch:
                self._commit(batch)
            if stop:
                return

    async def stop(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join, 60)
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeError("ingest is stopping"))
        self._close_connection()
        self.engine.dispose()


class LoopCommitter(_Committer):
    """Group commit on the event loop through the async engine (PostgreSQL)."""

    def __init__(self, engine: AsyncEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop
        self._queue: asyncio.Queue[Pending] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = self.loop.create_task(self._run(), name="ingest-commit")

    def submit(self, decision: Decision, stored: StoredFile, calling_ae: str) -> concurrent.futures.Future[Any]:
        item = Pending(decision, stored, calling_ae)
        self.loop.call_soon_threadsafe(self._queue.put_nowait, item)
        return item.future

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
            if batch:
                await self._commit_async(batch)

    async def _commit_async(self, batch: list[Pending]) -> None:
        async def transaction(items: list[Pending]) -> list[ImageReceived | Conflict | None]:
            async with self.engine.begin() as conn:
                return await conn.run_sync(record_batch, [(p.decision, p.stored, p.calling_ae) for p in items])

        async def fail(item: Pending, exc: Exception) -> None:
            if isinstance(exc, IntegrityError):
                with contextlib.suppress(Exception):
                    async with self.engine.connect() as conn:
                        if await conn.run_sync(_is_stored, item.decision.sop_instance_uid):
                            item.future.set_result(None)
                            return
            item.future.set_exception(exc)

        try:
            results = await transaction(batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if len(batch) == 1:
                await fail(batch[0], exc)
                return
            for item in batch:
                try:
                    item.future.set_result((await transaction([item]))[0])
                except asyncio.CancelledError:
                    raise
                except Exception as exc1:
                    await fail(item, exc1)
            return
        for item, result in zip(batch, results, strict=True):
            item.future.set_result(result)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeError("ingest is stopping"))


def make_committer(url: str, engine: AsyncEngine, loop: asyncio.AbstractEventLoop) -> ThreadCommitter | LoopCommitter:
    if make_url(url).get_backend_name() == "sqlite":
        return ThreadCommitter(url)
    return LoopCommitter(engine, loop)
