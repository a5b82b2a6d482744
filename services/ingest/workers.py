"""Several SCP processes on one DICOM port (PT_INGEST_WORKERS > 1).

One ingest process is one Python interpreter: its association threads share one GIL, so it uses at
most about one core of Python whatever the number of associations. With N workers, the process that
`pneumotriage ingest` starts (the primary) opens the listening socket and starts N - 1 worker
processes that inherit it; every process accepts from that one socket (the kernel hands each
connection to one of them; a connection waiting in the queue is never lost when a worker dies, the
others accept it) and runs the whole C-STORE path itself: validate, store, fsync, commit to the
shared database (SQLite in WAL mode, or PostgreSQL), answer.

Only the primary runs the outbox relay: the outbox rows of every worker are in the one database,
and each worker writes a byte to a pipe after it commits, which wakes the primary's relay as its
own commits do. Each worker serves /healthz and /metrics on PT_INGEST_HTTP_PORT + k (k = 1..N-1;
a port of 0 picks a free one). A worker that exits is a failure of the service: the primary stops
the others and exits non-zero, and its supervisor (pneumotriage up, systemd, Kubernetes) restarts
the whole service; nothing acknowledged is lost (each answer came after fsync + commit).

Limits (max associations, per peer, pending connections) are enforced per process: with N workers
a peer may hold up to N x PT_INGEST_MAX_ASSOCIATIONS_PER_PEER associations (docs/security.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

from services.ingest.config import IngestSettings

log = logging.getLogger(__name__)

ENV_LISTEN_FD = "PT_INGEST_WORKER_LISTEN_FD"  # internal: set by the primary for its workers
ENV_NOTIFY_FD = "PT_INGEST_WORKER_NOTIFY_FD"
ENV_INDEX = "PT_INGEST_WORKER_INDEX"
ENV_LIFELINE_FD = "PT_INGEST_WORKER_LIFELINE_FD"  # read end of a pipe only the primary writes to
STOP_TIMEOUT_S = 90.0
READY, COMMITTED = b"R", b"C"  # what a worker writes to the primary's pipe


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


class WorkerPool:
    """The primary's N - 1 worker processes: start, wake-ups from their commits, watch, stop."""

    def __init__(self, settings: IngestSettings, sock: socket.socket, on_commit: Callable[[], None]) -> None:
        self.settings = settings
        self.sock = sock
        self.on_commit = on_commit
        self.procs: list[subprocess.Popen[bytes]] = []
        self._readers: list[int] = []
        self._ready: set[int] = set()  # read ends of the workers that said READY
        self._reader_of: dict[int, int] = {}  # worker index -> read end of its pipe
        self._stopping = False
        # the workers read EOF from this pipe when the primary is gone, even after kill -9
        self._lifeline_read, self._lifeline_write = os.pipe()

    def http_port(self, index: int) -> int:
        base = self.settings.http_port
        return 0 if base == 0 else base + index

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        count = max(1, self.settings.workers)
        for index in range(1, count):
            read_fd, write_fd = os.pipe()
            os.set_blocking(read_fd, False)
            env = {
                **os.environ,
                ENV_LISTEN_FD: str(self.sock.fileno()),
                ENV_NOTIFY_FD: str(write_fd),
                ENV_INDEX: str(index),
                ENV_LIFELINE_FD: str(self._lifeline_read),
                "PT_INGEST_HTTP_PORT": str(self.http_port(index)),
            }
            proc = subprocess.Popen(
                [sys.executable, "-m", "services.ingest.workers"],
                env=env,
                pass_fds=(self.sock.fileno(), write_fd, self._lifeline_read),
            )
            os.close(write_fd)
            loop.add_reader(read_fd, self._drain, read_fd)
            self._reader_of[index] = read_fd
            self._readers.append(read_fd)
            self.procs.append(proc)
            log.info("ingest worker started", extra={"worker": index, "pid": proc.pid})

    def _drain(self, fd: int) -> None:
        try:
            data = os.read(fd, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if READY in data:
            self._ready.add(fd)
        if COMMITTED in data:
            self.on_commit()
        else:  # the worker's end closed: it exited; watch() reports it
            with contextlib.suppress(Exception):
                asyncio.get_running_loop().remove_reader(fd)

    def alive(self) -> int:
        """Workers running and accepting (they said READY once their SCP was listening)."""
        return sum(
            1
            for index, p in enumerate(self.procs, start=1)
            if p.poll() is None and self._reader_of.get(index) in self._ready
        )

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
        """SIGTERM every worker (each finishes its running associations), wait, then SIGKILL."""
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
        loop = asyncio.get_running_loop()
        for fd in self._readers:
            with contextlib.suppress(Exception):
                loop.remove_reader(fd)
            with contextlib.suppress(OSError):
                os.close(fd)
        self._readers.clear()
        for fd in (self._lifeline_read, self._lifeline_write):
            with contextlib.suppress(OSError):
                os.close(fd)


def _notifier(fd: int) -> Callable[[], None]:
    os.set_blocking(fd, False)

    def notify() -> None:
        with contextlib.suppress(BlockingIOError):  # the pipe is full: the primary is awake anyway
            os.write(fd, COMMITTED)

    return notify


async def _run_worker() -> None:
    from services.core.telemetry import configure_logging
    from services.ingest.app import IngestService, quiet_pydicom

    settings = IngestSettings()
    index = int(os.environ[ENV_INDEX])
    configure_logging(f"ingest-worker-{index}", settings.log_level, settings.log_json)
    quiet_pydicom()
    sock = socket.socket(fileno=int(os.environ[ENV_LISTEN_FD]))
    notify_fd = int(os.environ[ENV_NOTIFY_FD])
    service = IngestService(settings, listen_socket=sock, relay=False, notify=_notifier(notify_fd))
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    lifeline = int(os.environ[ENV_LIFELINE_FD])

    def primary_gone() -> None:  # EOF: the primary exited (even kill -9); stop, so the port is freed
        loop.remove_reader(lifeline)
        log.error("ingest primary gone: worker stopping", extra={"worker": index})
        stop.set()

    loop.add_reader(lifeline, primary_gone)
    await service.start()
    os.write(notify_fd, READY)
    log.info("ingest worker running", extra={"worker": index, "http_port": settings.http_port})
    await stop.wait()
    await service.stop()


if __name__ == "__main__":
    asyncio.run(_run_worker())
