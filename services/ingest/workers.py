"""Several SCP processes on one DICOM port (PT_INGEST_WORKERS > 1).

One ingest process is one Python interpreter: its association threads share one GIL, so it uses at
most about one core of Python whatever the number of associations. With N workers, the process that
`pneumotriage ingest` starts (the primary) opens the listening socket and starts N - 1 worker
processes that inherit it; every process accepts from that one socket (the kernel hands each
connection to one of them; a connection waiting in the queue is never lost when a worker dies: the
others accept it) and does the C-STORE work itself: receive, validate, hash, store with fsync.

The database commit stays in one place: a worker hands each instance to the primary over a pipe
(multiprocessing.connection, pickled records) and answers the C-STORE only when the primary's group
committer has committed it, together with what the other processes sent meanwhile. So there is
still one writer and one group commit per batch on SQLite (several processes writing would wait on
SQLite's lock with sleeping retries, and lose group commit), and one outbox relay, woken by every
commit. Each worker serves /healthz and /metrics on its own port (PT_INGEST_WORKER_HTTP_PORT_BASE
+ k - 1 for worker k, or a free port each; the primary's /healthz lists them).

A worker that exits is a failure of the service: the primary stops the others and exits non-zero,
and its supervisor (./pt up, systemd, Kubernetes) restarts the whole service; a worker whose
primary is gone (even after kill -9) sees its pipe close and stops, so the port is free for the
restart. Nothing acknowledged is lost: each answer came after fsync + commit.

Limits (max associations, per peer, pending connections) are enforced per process: with N workers
a peer may hold up to N x PT_INGEST_MAX_ASSOCIATIONS_PER_PEER associations (docs/security.md).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import itertools
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection, Pipe
from typing import Any

from services.core.net import free_port
from services.ingest.commit import Conflict
from services.ingest.config import IngestSettings
from services.ingest.store import StoredFile
from services.ingest.validate import Decision

log = logging.getLogger(__name__)

ENV_LISTEN_FD = "PT_INGEST_WORKER_LISTEN_FD"  # internal: set by the primary for its workers
ENV_PIPE_FD = "PT_INGEST_WORKER_PIPE_FD"
ENV_INDEX = "PT_INGEST_WORKER_INDEX"
STOP_TIMEOUT_S = 30.0  # within the runner's 60 s graceful stop
READY = "ready"  # worker -> primary: its SCP is listening
COMMIT = "commit"  # worker -> primary: (COMMIT, id, decision, stored, calling_ae); answer (id, stored?, error)


def listen_socket(host: str, port: int, backlog: int = 128) -> socket.socket:
    """The DICOM listening socket every worker accepts from (non-blocking: a worker that loses the
    race for a connection gets EAGAIN and goes back to waiting)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(backlog)
    sock.setblocking(False)
    return sock


Submit = Callable[[Decision, StoredFile, str], "concurrent.futures.Future[Any]"]


class WorkerPool:
    """The primary's N - 1 worker processes: start, commit on their behalf, watch, stop."""

    def __init__(self, settings: IngestSettings, sock: socket.socket, submit: Submit, on_commit: Callable[[], None]):
        self.settings = settings
        self.sock = sock
        self.submit = submit  # the primary's group committer
        self.on_commit = on_commit  # wakes the relay
        self.procs: list[subprocess.Popen[bytes]] = []
        self._conns: list[Connection] = []
        self.http_ports: list[int] = []  # worker k's /healthz and /metrics: http_ports[k - 1]
        self._ready: set[int] = set()
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None

    def http_port(self, index: int) -> int:
        base = self.settings.worker_http_port_base
        return base + index - 1 if base else free_port(self.settings.http_host)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        for index in range(1, max(1, self.settings.workers)):
            ours, theirs = Pipe(duplex=True)
            self.http_ports.append(self.http_port(index))
            env = {
                **os.environ,
                ENV_LISTEN_FD: str(self.sock.fileno()),
                ENV_PIPE_FD: str(theirs.fileno()),
                ENV_INDEX: str(index),
                "PT_INGEST_HTTP_PORT": str(self.http_ports[-1]),
            }
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.ingest.worker_process"],
                env=env,
                pass_fds=(self.sock.fileno(), theirs.fileno()),
            )
            theirs.close()
            self._conns.append(ours)
            self.procs.append(proc)
            threading.Thread(target=self._serve, args=(index, ours), name=f"ingest-worker-{index}", daemon=True).start()
            log.info("ingest worker started", extra={"worker": index, "pid": proc.pid})

    def _serve(self, index: int, conn: Connection) -> None:
        """Commit what worker `index` stored; answer each request when its commit is done."""
        send_lock = threading.Lock()

        def answer(request_id: int, future: concurrent.futures.Future[Any]) -> None:
            error = future.exception()
            result = None if error is not None else future.result()
            # True: a new instance; None: stored already; a Conflict: the UID is stored with other content
            outcome = result if isinstance(result, Conflict) else (result is not None)
            if outcome is True and self._loop is not None:
                self._loop.call_soon_threadsafe(self.on_commit)
            with send_lock, contextlib.suppress(OSError, ValueError):
                conn.send((request_id, outcome, None if error is None else repr(error)[:500]))

        while True:
            try:
                message = conn.recv()
            except (EOFError, OSError):
                return  # the worker exited; watch() reports it
            if message[0] == READY:
                self._ready.add(index)
            elif message[0] == COMMIT:
                _, request_id, decision, stored, calling_ae = message
                try:
                    future = self.submit(decision, stored, calling_ae)
                except Exception as exc:
                    future = concurrent.futures.Future()
                    future.set_exception(exc)
                future.add_done_callback(lambda f, r=request_id: answer(r, f))

    def alive(self) -> int:
        """Workers running and accepting (they said READY once their SCP was listening)."""
        return sum(1 for i, p in enumerate(self.procs, start=1) if p.poll() is None and i in self._ready)

    async def wait_ready(self, timeout: float = 120.0) -> None:
        """Until every worker accepts; raises when one exits first or the time is up."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self.alive() < len(self.procs):
            self._check_exits()
            if asyncio.get_running_loop().time() > deadline:
                raise TimeoutError(f"ingest workers not ready after {timeout:.0f} s")
            await asyncio.sleep(0.05)

    def _check_exits(self) -> None:
        for index, proc in enumerate(self.procs, start=1):
            code = proc.poll()
            if code is not None and not self._stopping:
                log.error("ingest worker exited", extra={"worker": index, "pid": proc.pid, "exit_code": code})
                raise RuntimeError(f"ingest worker {index} (pid {proc.pid}) exited with {code}")

    async def watch(self) -> None:
        """Return when a worker has exited while the service was not stopping (a failure)."""
        while True:
            self._check_exits()
            await asyncio.sleep(0.5)

    async def stop(self) -> None:
        """SIGTERM every worker (each finishes its running associations, still committing through
        us), wait, then SIGKILL. Call before the primary's committer stops."""
        self._stopping = True
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                await asyncio.to_thread(proc.wait, STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        for conn in self._conns:
            with contextlib.suppress(OSError):
                conn.close()


class RemoteCommitter:
    """A worker's committer: each instance is committed by the primary (same interface as
    commit.ThreadCommitter for the SCP: submit() -> Future, None when already stored)."""

    def __init__(self, conn: Connection, on_lost: Callable[[], None]) -> None:
        self.conn = conn
        self.on_lost = on_lost  # the primary is gone: the worker stops
        self._pending: dict[int, concurrent.futures.Future[Any]] = {}
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None

    def start(self) -> None:
        self._reader = threading.Thread(target=self._read, name="ingest-remote-commit", daemon=True)
        self._reader.start()

    def ready(self) -> None:
        with self._lock:
            self.conn.send((READY,))

    def submit(self, decision: Decision, stored: StoredFile, calling_ae: str) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._lock:
            request_id = next(self._ids)
            self._pending[request_id] = future
            try:
                self.conn.send((COMMIT, request_id, decision, stored, calling_ae))
            except (OSError, ValueError) as exc:
                del self._pending[request_id]
                future.set_exception(RuntimeError(f"the ingest primary is gone: {exc!r}"))
        return future

    def _read(self) -> None:
        while True:
            try:
                request_id, stored, error = self.conn.recv()
            except (EOFError, OSError):
                break
            with self._lock:
                future = self._pending.pop(request_id, None)
            if future is None or not future.set_running_or_notify_cancel():
                continue  # the sender gave up (timeout); the commit may have landed: a retry finds it
            if error is not None:
                future.set_exception(RuntimeError(f"commit failed in the ingest primary: {error}"))
            else:
                future.set_result(stored if isinstance(stored, Conflict) else (True if stored else None))
        with self._lock:
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if future.set_running_or_notify_cancel():
                future.set_exception(RuntimeError("the ingest primary is gone"))
        self.on_lost()

    async def stop(self) -> None:
        with contextlib.suppress(OSError):
            self.conn.close()
        if self._reader is not None:
            await asyncio.to_thread(self._reader.join, 10)
