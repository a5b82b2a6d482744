"""The running ingest service: DICOM SCP + outbox relay + /healthz and /metrics.

Run by services/core/runner.py (logging, signals, exit code). Start order: database migrations,
store directory, SCP (images are accepted even while the broker is down: they wait in the outbox),
relay (connects to RabbitMQ in the background, retrying), HTTP. SIGINT/SIGTERM: stop accepting
associations, let running ones finish, flush what the relay can, close; exit 0. The relay or the
HTTP server failing stops the process the same way with exit 1.
kill -9 is safe: an instance is acknowledged only after its file and rows are durable, and the relay
re-sends anything not marked published (consumers are idempotent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import Gauge
from sqlalchemy import text

from services.core.broker import Broker
from services.core.db import make_engine, make_sessionmaker, upgrade
from services.core.db.outbox import OUTBOX_BACKLOG, OutboxRelay
from services.core.runner import Components, ServiceRunner, with_broker
from services.core.telemetry import ops_app, serve_http
from services.ingest.commit import Committer, make_committer
from services.ingest.config import IngestSettings
from services.ingest.models import Base, Outbox
from services.ingest.scp import IngestSCP
from services.ingest.store import ContentStore
from services.ingest.workers import WorkerPool, listen_socket

log = logging.getLogger(__name__)
SERVICE = "ingest"
# /healthz calls the image store degraded below this much free space (statvfs, what an unprivileged
# writer may use): a C-STORE of a large CR/DX image needs tens of MiB, and the operator needs time.
STORE_MIN_FREE_BYTES = 64 * 1024 * 1024
STORE_PROBE_BYTES = 4096
# Set on each store_health() (every /healthz probe): the "disk nearly full" alert reads these.
STORE_FREE_BYTES = Gauge("pt_ingest_store_free_bytes", "Free bytes on the image store (statvfs, unprivileged)")
STORE_SIZE_BYTES = Gauge("pt_ingest_store_size_bytes", "Size of the image store's file system in bytes")


def store_health(root: Path, min_free_bytes: int = STORE_MIN_FREE_BYTES) -> dict[str, Any]:
    """The image store as a C-STORE would find it: a directory, with at least `min_free_bytes` free,
    where a small file can really be written, fsynced and removed (a full disk, a read-only or lost
    mount, exhausted inodes or quota fail this even when the directory looks writable).
    {"ok": bool, "free_bytes": int | None, "reason": str (when not ok)}"""
    if not root.is_dir():
        return {"ok": False, "free_bytes": None, "reason": "the store path is not a directory"}
    try:
        st = os.statvfs(root)
    except OSError as exc:
        return {"ok": False, "free_bytes": None, "reason": f"statvfs failed: {exc.strerror or exc}"}
    free = st.f_bavail * st.f_frsize
    STORE_FREE_BYTES.set(free)
    STORE_SIZE_BYTES.set(st.f_blocks * st.f_frsize)
    probe = root / f".healthz-{uuid.uuid4().hex}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, b"\0" * STORE_PROBE_BYTES)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return {"ok": False, "free_bytes": free, "reason": f"write probe failed: {exc.strerror or exc}"}
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()
    if free < min_free_bytes:
        reason = f"{free} bytes free, below the {min_free_bytes} bytes /healthz requires"
        return {"ok": False, "free_bytes": free, "reason": reason}
    return {"ok": True, "free_bytes": free}


class IngestService:
    """Everything of one ingest process; `await start()` / `await stop()` (tests run it in-process).

    With several workers (workers.py) every process gets the shared `listen_socket`; a worker runs no
    relay and no migrations (relay=False) and commits through the primary (`committer`). The primary
    (`IngestService.primary`) opens that socket and, once started, starts the other worker processes."""

    def __init__(
        self,
        settings: IngestSettings | None = None,
        listen_socket: socket.socket | None = None,
        relay: bool = True,
        committer: Committer | None = None,
    ) -> None:
        self.settings = settings or IngestSettings()
        self.listen_socket = listen_socket
        self.runs_relay = relay
        self.engine = make_engine(self.settings.database_url_for(SERVICE))
        self.sessions = make_sessionmaker(self.engine)
        self.store = ContentStore(self.settings.resolved_store_dir())
        self.broker = Broker(self.settings.amqp_url, self.settings.exchange, self.settings.quorum_queues)
        self.relay = OutboxRelay(SERVICE, self.sessions, Outbox, self.broker, idle_seconds=0.5)
        self.scp: IngestSCP | None = None
        self.committer: Committer | None = committer
        self._stop = asyncio.Event()
        self._notify_pending = False
        self.components = Components(self._stop)  # relay, HTTP: the runner stops on the first failure
        self.workers: WorkerPool | None = None  # the primary's other SCP processes, when there are any
        self._start_workers = False

    @classmethod
    def primary(cls, settings: IngestSettings) -> IngestService:
        """The first ingest process: with PT_INGEST_WORKERS > 1 it opens the one DICOM port for every
        process and, once started (after the migrations: workers never migrate), starts the others."""
        if settings.workers <= 1:
            return cls(settings)
        service = cls(settings, listen_socket=listen_socket(settings.host, settings.port))
        service._start_workers = True
        return service

    async def start(self, http: bool = True, migrate: bool = True) -> IngestService:
        # the process runner migrates first (ServiceRunner.migrate), workers after their primary did;
        # in-process tests migrate here
        if migrate:
            await upgrade(self.engine, SERVICE, Base.metadata)
        self.store.root.mkdir(parents=True, exist_ok=True)
        loop = asyncio.get_running_loop()
        if self.committer is None:
            self.committer = make_committer(self.settings.database_url_for(SERVICE), self.engine, loop)
        self.committer.start()
        on_commit = self._events_committed if self.runs_relay else None  # the primary wakes its relay
        self.scp = IngestSCP(self.settings, self.sessions, self.store, loop, self.committer, on_commit=on_commit)
        self.scp.start(self.listen_socket)
        if self.runs_relay:
            self.components.spawn("relay", self._run_relay())
        if http:
            app = ops_app(SERVICE, self.health)
            self.components.spawn("http", serve_http(app, self.settings.http_host, self.settings.http_port))
        if self._start_workers:
            assert self.listen_socket is not None
            self.workers = WorkerPool(self.settings, self.listen_socket, self.committer.submit, self._events_committed)
            self.workers.start(loop)
            await self.workers.wait_ready()
            self.components.spawn("workers", self.workers.watch())
        if self.runs_relay:  # the primary (a worker logs its own line)
            s = self.settings
            log.info(
                "ingest listening",
                extra={"dicom_port": self.dicom_port, "http_port": s.http_port, "workers": s.workers},
            )
        return self

    def _events_committed(self) -> None:
        """Wake the relay shortly after new events commit: one wake-up per burst, so the relay
        publishes them as one batch (one query, one commit) rather than one round per image."""
        if self._notify_pending:
            return
        self._notify_pending = True

        def fire() -> None:
            self._notify_pending = False
            self.relay.notify()

        asyncio.get_running_loop().call_later(self.settings.relay_coalesce_s, fire)

    @property
    def dicom_port(self) -> int:
        assert self.scp is not None
        return self.scp.port

    async def _run_relay(self) -> None:
        """Connect (retrying: images keep arriving and wait in the outbox meanwhile), then relay."""

        async def broker_down(_error: BaseException) -> None:
            OUTBOX_BACKLOG.labels(SERVICE).set(await self._backlog_or_zero())

        await with_broker(
            self.broker, self._stop, lambda: self.relay.run(self._stop), max_delay=5.0, on_retry=broker_down
        )

    async def _backlog_or_zero(self) -> int:
        try:
            return await self.relay.backlog()
        except Exception:
            return 0

    async def health(self) -> dict[str, Any]:
        db_ok = True
        try:
            async with self.engine.connect() as conn:
                await conn.execute(text("SELECT 1"))
        except Exception:
            db_ok = False
        backlog = await self._backlog_or_zero() if db_ok else -1
        store = await asyncio.to_thread(store_health, self.store.root)
        if not store["ok"]:
            log.warning("image store degraded", extra={"reason": store["reason"], "free_bytes": store["free_bytes"]})
        return {
            "dicom": self.scp is not None and self.scp.listening(),
            "database": db_ok,
            "store": store,
            # the broker being down degrades nothing: images wait in the outbox
            "broker": {"ok": True, "connected": self.broker.is_connected, "outbox_backlog": backlog},
            "workers": self._workers_health(),
        }

    def _workers_health(self) -> dict[str, Any]:
        alive = 1 + (self.workers.alive() if self.workers is not None else 0)
        expected = self.settings.workers if self.workers is not None else 1
        ports = self.workers.http_ports if self.workers is not None else []
        return {"ok": alive == expected, "configured": self.settings.workers, "alive": alive, "http_ports": ports}

    async def stop(self) -> None:
        if self.workers is not None:  # first: they commit through our committer until they are done
            await self.workers.stop()
        if self.scp is not None:
            await asyncio.to_thread(self.scp.shutdown)  # running associations need the loop to finish
            await self.scp.committer.stop()
        elif self.committer is not None:
            await self.committer.stop()
        self._stop.set()
        with contextlib.suppress(Exception):  # one last flush of the outbox, bounded
            if self.broker.is_connected:
                await asyncio.wait_for(self.relay.run_once(), timeout=10)
        await self.components.cancel()
        await self.broker.close()
        await self.engine.dispose()

    async def wait(self) -> None:
        await self._stop.wait()

    def request_stop(self) -> None:
        self._stop.set()


def quiet_pydicom() -> None:
    """pydicom's value warnings can quote header values (names, dates): our own validation decides, and
    logs only codes, so in the service its warnings are off (process-wide, hence not done in tests)."""
    import pydicom.config

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=r"pydicom(\..*)?")


def main(settings: IngestSettings | None = None) -> None:
    """The ingest process (services/core/runner.py: logging, signals, migrations, exit code). With
    PT_INGEST_WORKERS > 1 it is the primary: it opens the port, then starts the other worker
    processes (workers.py); one of them exiting stops the service with exit 1."""
    settings = settings or IngestSettings()
    quiet_pydicom()

    async def start(runner: ServiceRunner) -> Callable[[], Awaitable[None]]:
        service = IngestService.primary(settings)
        await runner.migrate(service.engine, SERVICE, Base.metadata)
        return await runner.start_service(service)

    ServiceRunner(SERVICE, settings).main(start)
