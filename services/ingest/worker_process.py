"""The entry point of an ingest worker process (started by workers.WorkerPool in the first ingest
process with PT_INGEST_WORKERS > 1): the inherited listening socket, a committer that commits
through the first process, and the same service runner as every service."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from multiprocessing.connection import Connection

from services.core.runner import ServiceRunner
from services.ingest.app import IngestService, quiet_pydicom
from services.ingest.config import IngestSettings
from services.ingest.workers import ENV_INDEX, ENV_LISTEN_FD, ENV_PIPE_FD, RemoteCommitter

log = logging.getLogger(__name__)


def worker_main() -> None:
    """A worker process (started by the primary's WorkerPool), run by the same service runner:
    exit 0 on SIGTERM, 1 when a component fails or the primary is gone."""
    settings = IngestSettings()
    index = int(os.environ[ENV_INDEX])
    quiet_pydicom()

    async def start(runner: ServiceRunner) -> Callable[[], Awaitable[None]]:
        loop = asyncio.get_running_loop()
        gone = asyncio.Event()
        committer = RemoteCommitter(
            Connection(int(os.environ[ENV_PIPE_FD])), lambda: loop.call_soon_threadsafe(gone.set)
        )
        sock = socket.socket(fileno=int(os.environ[ENV_LISTEN_FD]))
        service = IngestService(settings, listen_socket=sock, relay=False, committer=committer)
        stop = await runner.start_service(service)

        async def primary_alive() -> None:
            await gone.wait()  # its pipe closed: the primary exited (even kill -9); free the port
            if not runner.stop.is_set():
                raise RuntimeError("the ingest primary is gone")

        runner.spawn("primary", primary_alive())
        committer.ready()
        log.info("ingest worker running", extra={"worker": index, "http_port": settings.http_port})
        return stop

    ServiceRunner(f"ingest-worker-{index}", settings).main(start)


if __name__ == "__main__":
    worker_main()
