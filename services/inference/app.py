"""The running inference service: consume inference.images, publish prediction.made, serve ops HTTP.

Start: load the model (embedded onnxruntime) or connect to Triton (it may come up later: /healthz
says 503 until it answers), connect to RabbitMQ (retried until it answers), consume with a bounded
prefetch, serve /healthz and /metrics on PT_INFERENCE_HTTP_PORT.
Stop (SIGINT/SIGTERM): take no new messages, let in-flight images finish and publish (up to
PT_INFERENCE_DRAIN_TIMEOUT_S), close the connection — whatever is unacked goes back to the queue;
exit 0. The ops server or the consumer failing stops the process with exit 1 (services/core/runner.py).
kill -9 is safe: nothing is acked before its prediction is confirmed by the broker, and the only
local state (heatmap PNGs) is written atomically under a deterministic name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from services.core.broker import CONSUMERS, Broker
from services.core.runner import Components, ServiceRunner, with_broker
from services.core.telemetry import ops_app, serve_http
from services.inference.config import InferenceSettings
from services.inference.runtime import InferenceRuntime, make_runtime
from services.inference.shadow import ShadowScorer, ShadowStore, parse_versions, store_path
from services.inference.worker import RUNTIME_UP, InferenceWorker, Pipeline

log = logging.getLogger("services.inference")


def make_shadow(settings: InferenceSettings) -> ShadowScorer | None:
    """PT_INFERENCE_SHADOW_VERSIONS: the candidate versions scored beside the active one (None: none)."""
    versions = parse_versions(settings.shadow_versions)
    if not versions:
        return None
    store = ShadowStore(store_path(settings.data_dir))
    return ShadowScorer(
        settings.model_repository, settings.model_name, versions, store, threads=settings.shadow_threads
    )


class InferenceService:
    """The inference process's own object: `await start()` / `await stop()` like every service (its one
    component is `run`, which drains and closes by itself once stopped); tests may also drive `run(stop)`."""

    def __init__(self, settings: InferenceSettings, runtime: InferenceRuntime | None = None) -> None:
        self.settings = settings
        self.runtime = runtime or make_runtime(settings)
        self.broker = Broker(settings.amqp_url, settings.exchange, settings.quorum_queues)
        self.pipeline = Pipeline(
            self.runtime,
            max_batch=settings.max_batch,
            max_wait_ms=settings.max_wait_ms,
            decode_workers=settings.decode_workers,
            heatmap_dir=settings.resolved_heatmap_dir(),
            max_backoff_s=settings.retry_max_backoff_s,
            decode_processes=settings.decode_processes,
            gate_file=settings.resolved_gate_file(),
            shadow=make_shadow(settings),
        )
        self.worker = InferenceWorker(self.broker, self.pipeline)
        self.started = asyncio.Event()
        self._stop = asyncio.Event()
        self.components = Components(self._stop)

    async def start(self, migrate: bool = True) -> InferenceService:
        """Run the service as one component (`migrate`: no database, nothing to migrate)."""
        self.components.spawn("inference", self.run(self._stop))
        return self

    async def stop(self) -> None:
        """Stop taking messages; `run` drains the in-flight images and closes by itself."""
        self._stop.set()
        if self.components.tasks:
            await asyncio.wait(self.components.tasks)

    async def health(self) -> dict[str, Any]:
        runtime_ok = await self.runtime.ready() and self.pipeline.batcher.available
        RUNTIME_UP.set(1 if runtime_ok else 0)
        return {
            "broker": self.broker.is_connected,
            "runtime": {"ok": runtime_ok, **self.runtime.describe()},
            "consuming": self.started.is_set(),  # ready only once it takes work from its queue
            # a dict with "ok": the health route counts a value that is neither True nor {"ok": true, ...}
            # as failing (a bare list made every service start-up wait on a 503 forever)
            "shadow_versions": {"ok": True, "versions": self.pipeline.shadow.versions if self.pipeline.shadow else []},
        }

    async def run(self, stop: asyncio.Event) -> None:
        """Serve until `stop` (drain in-flight images, then close) or until a component fails: the ops
        HTTP server, or the consumer (runtime start-up, broker, consume) — then raise its error."""
        s = self.settings
        components = Components(stop)
        http = components.spawn("http", serve_http(ops_app("inference", self.health), s.http_host, s.http_port))
        consumer = components.spawn("consumer", self._consume(stop))
        waiters = [asyncio.create_task(stop.wait()), asyncio.create_task(components.failed.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            failure = components.failure
            if failure is not None and not stop.is_set():
                raise failure.error or RuntimeError(f"inference {failure.component} stopped unexpectedly")
            if self.started.is_set():
                log.info("stopping: draining in-flight images")
                drained = await self.worker.drain(s.drain_timeout_s)
                if not drained:
                    log.warning("drain timed out; unacked messages return to the queue")
        finally:
            for waiter in waiters:
                waiter.cancel()
            consumer.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await consumer
            await self.broker.close()
            self.worker.release()
            await self.pipeline.close()
            await self.runtime.close()
            http.cancel()  # serve_http closes uvicorn gracefully (socket released) on cancel
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await http
            log.info("inference service stopped")

    async def _consume(self, stop: asyncio.Event) -> None:
        """Start the runtime, connect (retrying while the broker is down), consume until `stop`."""
        await self.runtime.start()
        if self.pipeline.shadow is not None:
            await self.pipeline.shadow.start()

        async def consume() -> None:
            s = self.settings
            self.pipeline.start()
            await self.broker.consume(CONSUMERS["inference"], self.worker.handle, prefetch=s.prefetch)
            log.info(
                "inference service started",
                extra={"runtime": self.runtime.describe(), "http_port": s.http_port, "prefetch": s.prefetch},
            )
            self.started.set()
            await stop.wait()

        await with_broker(self.broker, stop, consume)


def main(settings: InferenceSettings | None = None) -> None:
    """The inference process (services/core/runner.py: logging, signals, exit code). No database;
    `run` is its one component: it ends by itself once stopped (after draining), and raises when the
    runtime or the ops server fails."""
    settings = settings or InferenceSettings()

    async def start(runner: ServiceRunner) -> Callable[[], Awaitable[None]]:
        return await runner.start_service(InferenceService(settings))

    # the drain may take PT_INFERENCE_DRAIN_TIMEOUT_S, then the runtime closes
    ServiceRunner("inference", settings, stop_timeout_s=settings.drain_timeout_s + 30).main(start)
