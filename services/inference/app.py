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
from services.core.telemetry import configure_logging, ops_app, serve_http
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
            gate_file=settings.resolved_gate_file(),
        )
        self.worker = InferenceWorker(self.broker, self.pipeline)
        self.started = asyncio.Event()

    async def health(self) -> dict[str, Any]:
        runtime_ok = await self.runtime.ready() and self.pipeline.batcher.available
        RUNTIME_UP.set(1 if runtime_ok else 0)
        return {
            "broker": self.broker.is_connected,
            "runtime": {"ok": runtime_ok, **self.runtime.describe()},
            "consuming": self.started.is_set(),  # ready only once it takes work from its queue
        }

    async def run(self, stop: asyncio.Event) -> None:
        s = self.settings
        http = asyncio.create_task(
            serve_http(ops_app("inference", self.health), s.http_host, s.http_port), name="inference-ops-http"
        )
        stopped = asyncio.create_task(stop.wait())
        try:
            await self.runtime.start()
            if not await self.broker.connect_with_retry(stop):
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
            http.cancel()  # serve_http closes uvicorn gracefully (socket released) on cancel
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await http
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
