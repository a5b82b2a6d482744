"""The running inference service: consume inference.images, publish prediction.made, serve ops HTTP.

Start: load the model (embedded onnxruntime) or connect to Triton (it may come up later: /healthz
says 503 until it answers), connect to RabbitMQ (retried until it answers), consume with a bounded
prefetch, serve /healthz and /metrics on PT_INFERENCE_HTTP_PORT.
Stop (SIGINT/SIGTERM): take no new messages, let in-flight images finish and publish (up to
PT_INFERENCE_DRAIN_TIMEOUT_S), close the connection — whatever is unacked goes back to the queue.
kill -9 is safe: nothing is acked before its prediction is confirmed by the broker, and the only
local state (heatmap PNGs) is written atomically under a deterministic name.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from typing import Any

from services.core.broker import CONSUMERS, Broker
from services.core.telemetry import configure_logging, ops_app
from services.inference.config import InferenceSettings
from services.inference.runtime import InferenceRuntime, make_runtime
from services.inference.worker import RUNTIME_UP, InferenceWorker, Pipeline

log = logging.getLogger("services.inference")


class InferenceService:
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
        )
        self.worker = InferenceWorker(self.broker, self.pipeline)
        self.started = asyncio.Event()
        self._http: Any = None

    async def health(self) -> dict[str, Any]:
        runtime_ok = await self.runtime.ready() and self.pipeline.batcher.available
        RUNTIME_UP.set(1 if runtime_ok else 0)
        return {
            "broker": self.broker.is_connected,
            "runtime": {"ok": runtime_ok, **self.runtime.describe()},
        }

    async def _connect_broker(self, stop: asyncio.Event) -> bool:
        delay = 0.5
        while not stop.is_set():
            try:
                await self.broker.connect()
                return True
            except Exception as exc:
                log.warning("broker not reachable, retrying", extra={"error": repr(exc), "delay_s": delay})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                delay = min(delay * 2, 10.0)
        return False

    async def _serve_ops(self) -> None:
        """/healthz + /metrics. Like telemetry.serve_http, but stopped through should_exit so the
        listening socket is closed at once (a cancelled uvicorn keeps the port bound), and a port
        that cannot be bound is an ordinary error here instead of uvicorn's sys.exit."""
        import uvicorn

        s = self.settings
        config = uvicorn.Config(
            ops_app("inference", self.health),
            host=s.http_host,
            port=s.http_port,
            log_level="warning",
            access_log=False,
            lifespan="off",
        )
        self._http = uvicorn.Server(config)
        self._http.capture_signals = contextlib.nullcontext  # type: ignore[method-assign]  # we own signals
        try:
            await self._http.serve()
        except SystemExit:
            raise RuntimeError(f"cannot serve HTTP on {s.http_host}:{s.http_port} (port in use?)") from None

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        http = asyncio.create_task(self._serve_ops(), name="inference-ops-http")
        stopped = asyncio.create_task(stop.wait())
        try:
            await self.runtime.start()
            if not await self._connect_broker(stop):
                return
            self.pipeline.start()
            await self.broker.consume(CONSUMERS["inference"], self.worker.handle, prefetch=s.prefetch)
            log.info(
                "inference service started",
                extra={"runtime": self.runtime.describe(), "http_port": s.http_port, "prefetch": s.prefetch},
            )
            self.started.set()
            await asyncio.wait({stopped, http}, return_when=asyncio.FIRST_COMPLETED)
            if http.done():
                http.result()  # the ops server died: a fatal error for the service
                raise RuntimeError("the ops HTTP server stopped unexpectedly")
            log.info("stopping: draining in-flight images")
            drained = await self.worker.drain(s.drain_timeout_s)
            if not drained:
                log.warning("drain timed out; unacked messages return to the queue")
        finally:
            stopped.cancel()
            await self.broker.close()
            self.worker.release()
            await self.pipeline.close()
            await self.runtime.close()
            if self._http is not None:
                self._http.should_exit = True
            try:
                await asyncio.wait_for(asyncio.shield(http), 10)
            except Exception:  # already reported, or a port that never opened
                http.cancel()
            log.info("inference service stopped")


async def serve(settings: InferenceSettings) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await InferenceService(settings).run(stop)


def main(settings: InferenceSettings | None = None) -> None:
    settings = settings or InferenceSettings()
    configure_logging("inference", settings.log_level, settings.log_json)
    asyncio.run(serve(settings))
