"""One process life cycle for every service (ingest, inference, labeling, aggregator).

Every service's own object has one shape (`Service`): `components` (its task group), `await start()`
and `await stop()`; tests run those objects in-process. A service's `main()` is
`ServiceRunner(name, settings).main(start)`, and its `start(runner)` is the same few lines in every
service: build the object, `await runner.migrate(...)` when it has a database, then
`return await runner.start_service(service)` (start it, watch its components, hand back its stop).
The runner does the rest, in this order:

1. structured logging (`configure_logging`: PT_LOG_LEVEL, PT_LOG_JSON);
2. SIGINT/SIGTERM set `runner.stop` (installed first, so a signal during start-up is a clean stop);
3. database migrations: `await runner.migrate(engine, service, metadata)` inside `start`, before
   anything listens;
4. the components run as one task group (`Components`): long-running coroutines (a consumer, a relay,
   the HTTP server, ...). A component that raises, or that returns while the service is not stopping,
   is a failure;
5. the process runs until a signal (exit 0) or the FIRST component failure (exit 1, so that a
   supervisor or Kubernetes restarts it instead of reading the failure as a clean stop). A start-up
   that raises (a refused secret key, a failed migration, an unwritable store) is exit 1 as well;
6. once started, the start-up heap is frozen (`gc.freeze()`, process entry point only): modules,
   SQLAlchemy metadata, pydicom's dictionaries and the DICOM contexts (~140,000 objects in
   ingest) move to the permanent generation, so a full collection no longer walks them. A full
   collection took ~50 ms in ingest, with every thread stopped, and pynetdicom's server forces
   one every 60 turns of its accept loop (`AssociationServer.service_actions`): a latency spike
   for every open association. After the freeze it takes well under a millisecond;
7. stop: `runner.stop` is set, then the service's own graceful stop runs (its order: stop intake,
   finish or flush in-flight work, close connections), bounded by `stop_timeout_s`; whatever
   component still runs after it is cancelled.

The broker is never a start-up dependency: `with_broker()` connects with retry
(`Broker.connect_with_retry`, exponential back-off) inside a component, so every service starts,
serves /healthz (degraded) and keeps its own duties while RabbitMQ is down or restarting.

Tests run each service's own object in-process (`IngestService.start()`/`stop()`, ...); this module is
only about the process around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, NoReturn, Protocol

from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine

from services.core.broker import Broker
from services.core.db import upgrade
from services.core.telemetry import configure_logging

log = logging.getLogger("services.core.runner")

StopFn = Callable[[], Awaitable[None]]
StartFn = Callable[["ServiceRunner"], Awaitable[StopFn | None]]


class LoggingSettings(Protocol):
    log_level: str
    log_json: bool


@dataclass(frozen=True)
class ComponentFailure:
    component: str
    error: BaseException | None  # None: it returned while the service was not stopping
    at: float = field(default_factory=time.monotonic)

    def __str__(self) -> str:
        return f"{self.component}: {self.error!r}" if self.error is not None else f"{self.component}: ended"


class Components:
    """A task group of named long-running components.

    Unlike `asyncio.TaskGroup` it does not cancel the others itself: it records the FIRST failure and
    sets `failed`, and whoever owns the service decides the stop order (the runner, or a test that
    runs the service in-process and never looks). Returning is normal only once `stopping` is set.
    """

    def __init__(self, stopping: asyncio.Event | None = None) -> None:
        self.stopping = stopping or asyncio.Event()
        self.failed = asyncio.Event()
        self.failure: ComponentFailure | None = None
        self.tasks: list[asyncio.Task[Any]] = []

    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self.tasks.append(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled():
            return
        error = task.exception()  # retrieved here: no "exception was never retrieved" at exit
        if error is None and self.stopping.is_set():
            return
        failure = ComponentFailure(task.get_name(), error)
        log.error(
            "component failed",
            extra={"component": failure.component, "error": repr(error) if error is not None else "ended"},
            exc_info=error if error is not None else None,
        )
        if self.failure is None:
            self.failure = failure
            self.failed.set()

    async def cancel(self) -> None:
        """Cancel what still runs and wait for it to end."""
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


async def with_broker(
    broker: Broker,
    stop: asyncio.Event,
    then: Callable[[], Awaitable[None]],
    *,
    max_delay: float = 10.0,
    on_retry: Callable[[BaseException], Awaitable[None]] | None = None,
) -> None:
    """A component that connects to the broker, retrying with back-off until it works or `stop` is
    set, then runs `then()` (consume, relay the outbox, ...). Returns at once when stopped first."""
    if await broker.connect_with_retry(stop, max_delay=max_delay, on_retry=on_retry):
        log.info("broker connected", extra={"exchange": broker.exchange_name})
        await then()


class Service(Protocol):
    """The shape of every service's own object (IngestService, InferenceService, LabelingService,
    AggregatorService): what the runner starts, watches and stops, and what tests run in-process."""

    components: Components  # its long-running components; the first failure stops the process

    async def start(self, migrate: bool = True) -> object:
        """Start the components (in-process tests let it migrate; the runner migrated already)."""
        ...

    async def stop(self) -> None:
        """The graceful stop, in the service's own order; safe after a partial or failed start."""
        ...


class ServiceRunner:
    """The life cycle of one service process (see the module docstring)."""

    def __init__(
        self,
        name: str,
        settings: LoggingSettings | None = None,
        *,
        stop_timeout_s: float = 60.0,
        signals: tuple[signal.Signals, ...] = (signal.SIGINT, signal.SIGTERM),
    ) -> None:
        self.name = name
        self.settings = settings
        self.stop_timeout_s = stop_timeout_s
        self.signals = signals
        self.stop = asyncio.Event()
        self.components = Components(self.stop)
        self._watched: list[Components] = [self.components]
        self.log = logging.getLogger(f"services.{name}")
        self.freeze_heap = False  # main() sets it: in-process tests must not freeze the test's heap

    # ---- what `start` uses ------------------------------------------------------------------
    def spawn(self, name: str, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run a component in the runner's task group (a normal end needs `runner.stop`)."""
        return self.components.spawn(name, coro)

    def watch(self, components: Components) -> None:
        """Also stop the process on the first failure in a service's own task group."""
        self._watched.append(components)

    async def start_service(self, service: Service) -> StopFn:
        """Start the service (migrations done: `migrate` first), watch its components and return its
        graceful stop. A start that raises stops what did start before the process exits."""
        self.watch(service.components)
        try:
            await service.start(migrate=False)
        except BaseException:
            await service.stop()
            raise
        return service.stop

    async def migrate(self, engine: AsyncEngine, service: str, metadata: MetaData) -> None:
        """Bring the service's database to the newest revision (before anything listens)."""
        self.log.info("migrating database", extra={"dialect": engine.dialect.name})
        await upgrade(engine, service, metadata)

    # ---- the life cycle ---------------------------------------------------------------------
    async def run(self, start: StartFn) -> int:
        """Start, serve until a signal (0) or the first failure (1), stop gracefully; the exit code."""
        loop = asyncio.get_running_loop()
        installed: list[signal.Signals] = []
        for sig in self.signals:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, self._on_signal, sig)
                installed.append(sig)
        stop_service: StopFn | None = None
        failure: str | None = None
        try:
            try:
                stop_service = await start(self)
            except Exception as exc:
                failure = f"start-up: {exc!r}"
                self.log.error("start-up failed", extra={"error": repr(exc)}, exc_info=exc)
            else:
                if self.freeze_heap:
                    self._freeze_start_up_heap()
                failure = await self._serve()
            await self._shutdown(stop_service, failure)
        finally:
            for sig in installed:
                loop.remove_signal_handler(sig)
        return 1 if failure is not None else 0

    def _freeze_start_up_heap(self) -> None:
        gc.collect()  # start-up garbage first: frozen objects are never collected
        gc.freeze()
        t0 = time.perf_counter()
        gc.collect()
        self.log.info(
            "start-up heap frozen",
            extra={"objects": gc.get_freeze_count(), "full_gc_ms": round((time.perf_counter() - t0) * 1000, 2)},
        )

    def main(self, start: StartFn) -> NoReturn:
        """The process entry point: logging, the event loop, the exit code."""
        self.freeze_heap = True
        if self.settings is not None:
            configure_logging(self.name, self.settings.log_level, self.settings.log_json)
        sys.exit(asyncio.run(self.run(start)))

    def _on_signal(self, sig: signal.Signals) -> None:
        if not self.stop.is_set():
            self.log.info(f"{self.name} stopping", extra={"signal": sig.name})
        self.stop.set()

    async def _serve(self) -> str | None:
        """Wait for a signal or the first component failure; the failure, or None."""
        waiters = [asyncio.create_task(self.stop.wait())]
        waiters += [asyncio.create_task(group.failed.wait()) for group in self._watched]
        self.log.info(f"{self.name} running")
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        failures = [group.failure for group in self._watched if group.failure is not None]
        if failures and not self.stop.is_set():
            first = min(failures, key=lambda f: f.at)
            self.log.error(f"{self.name} stopping: a component failed", extra={"failure": str(first)})
            return str(first)
        return None

    async def _shutdown(self, stop_service: StopFn | None, failure: str | None) -> None:
        self.stop.set()
        if stop_service is not None:
            try:
                await asyncio.wait_for(stop_service(), timeout=self.stop_timeout_s)
            except TimeoutError:
                self.log.warning("graceful stop timed out", extra={"timeout_s": self.stop_timeout_s})
            except Exception as exc:
                self.log.warning("graceful stop failed", extra={"error": repr(exc)}, exc_info=exc)
        for group in self._watched:
            await group.cancel()
        self.log.info(f"{self.name} stopped", extra={"exit_code": 1 if failure is not None else 0})
