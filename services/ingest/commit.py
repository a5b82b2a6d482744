"""Committing stored instances: rows + outbox event in one transaction, with group commit.

The transaction itself is written once, as plain SQLAlchemy Core on a synchronous Connection
(`record_batch`): the study (upsert, image count), the series (upsert), the instance and its
ImageReceived outbox row. Whatever arrived from concurrent associations while the previous commit
ran goes into the next transaction together (one fsync for all of them); each C-STORE is answered
only after the commit holding its rows. A failing batch is retried one instance per transaction, so
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


@dataclass
class Pending:
    decision: Decision
    stored: StoredFile
    calling_ae: str
    future: concurrent.futures.Future[ImageReceived | None] = field(default_factory=concurrent.futures.Future)


_STATEMENTS: dict[str, dict[str, Any]] = {}


def _statements(conn: Connection) -> dict[str, Any]:
    """The statements of add_stored, built once per dialect with bind parameters: SQLAlchemy then
    reuses their compiled form, instead of building and compiling five new statements per image."""
    name = conn.dialect.name
    found = _STATEMENTS.get(name)
    if found is not None:
        return found
    ins = pg_insert if name == "postgresql" else sqlite_insert
    study = ins(Study).values(study_instance_uid=bindparam("uid"), image_count=1, created_at=bindparam("now"))
    study = study.on_conflict_do_update(
        index_elements=[Study.study_instance_uid], set_={"image_count": Study.image_count + 1}
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
        "exists": select(Instance.id).where(Instance.sop_instance_uid == bindparam("uid")),
        "study": study,
        "series": series,
        "instance": insert(Instance),
        "outbox": insert(Outbox),
    }
    _STATEMENTS[name] = built
    return built


def _study(conn: Connection, uid: str, now: datetime) -> tuple[int, int]:
    """(id, image count including this image) of the study, created on first sight: one statement."""
    row = conn.execute(_statements(conn)["study"], {"uid": uid, "now": now}).one()
    return int(row.id), int(row.image_count)


def _series(conn: Connection, uid: str, study_id: int, modality: str, now: datetime) -> int:
    params = {"uid": uid, "study_id": study_id, "modality": modality, "now": now}
    return int(conn.execute(_statements(conn)["series"], params).scalar_one())


def add_stored(conn: Connection, decision: Decision, stored: StoredFile, calling_ae: str) -> ImageReceived | None:
    """Write one instance and its event in the connection's transaction; None when already stored."""
    now = datetime.now(UTC)
    uid = decision.sop_instance_uid
    statements = _statements(conn)
    if conn.execute(statements["exists"], {"uid": uid}).first() is not None:
        return None
    study_id, study_count = _study(conn, decision.study_instance_uid, now)
    series_id = _series(conn, decision.series_instance_uid, study_id, decision.modality, now)
    not_triaged = decision.reason if not decision.triage_eligible else ""
    conn.execute(
        statements["instance"],
        dict(
            sop_instance_uid=uid,
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
            not_triaged_reason=not_triaged,
            outside_intended_use=decision.outside_intended_use,
            calling_ae_title=calling_ae,
            received_at=now,
        ),
    )
    received = ImageReceived(
        image=ImageRef(
            study_instance_uid=decision.study_instance_uid,
            series_instance_uid=decision.series_instance_uid,
            sop_instance_uid=uid,
            sop_class_uid=decision.sop_class_uid,
            storage_uri=stored.uri,
            sha256=stored.sha256,
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
        not_triaged_reason=not_triaged,
    )
    # the same outbox row add_event writes, inserted with Core (no ORM session on this thread)
    conn.execute(
        statements["outbox"],
        {**outbox_row(received, message_id=message_id(uid), correlation_id=uid), "created_at": now, "attempts": 0},
    )
    return received


def record_batch(conn: Connection, items: list[tuple[Decision, StoredFile, str]]) -> list[ImageReceived | None]:
    return [add_stored(conn, d, s, ae) for d, s, ae in items]


def _is_stored(conn: Connection, uid: str) -> bool:
    return conn.execute(select(Instance.id).where(Instance.sop_instance_uid == uid)).first() is not None


class Committer(Protocol):
    """What the SCP commits through: ThreadCommitter (SQLite), LoopCommitter (PostgreSQL) or, in a
    worker process, workers.RemoteCommitter (the first process commits)."""

    def start(self) -> None: ...

    def submit(self, decision: Decision, stored: StoredFile, calling_ae: str) -> concurrent.futures.Future[Any]: ...

    async def stop(self) -> None: ...


class _Committer:
    """Shared batching logic; subclasses say how a transaction runs."""

    max_batch = 64

    def _transaction(self, items: list[Pending]) -> list[ImageReceived | None]:
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

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ingest-commit", daemon=True)
        self._thread.start()

    def submit(self, decision: Decision, stored: StoredFile, calling_ae: str) -> concurrent.futures.Future[Any]:
        item = Pending(decision, stored, calling_ae)
        self._queue.put(item)
        return item.future

    def _transaction(self, items: list[Pending]) -> list[ImageReceived | None]:
        with self.engine.begin() as conn:
            return record_batch(conn, [(p.decision, p.stored, p.calling_ae) for p in items])

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
        async def transaction(items: list[Pending]) -> list[ImageReceived | None]:
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
