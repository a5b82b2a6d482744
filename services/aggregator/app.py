"""The running aggregator — the composition root: the service object (`service.py`), the web
worklist / JSON API / FHIR (`web/app.py`) on PT_AGGREGATOR_HTTP_PORT, and the consumer, outbox relay,
SR sender and drift monitor, in one asyncio process. Nothing imports this module but the CLI.

Safe under kill -9: an event is acked only after the transaction that applied it (and staged its
triage.updated + SR delivery) committed; a redelivery recomputes the same result and changes
nothing. SIGINT/SIGTERM stop consuming, let in-flight handlers finish and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from services.aggregator.config import AggregatorSettings
from services.aggregator.service import Aggregator
from services.aggregator.web.app import create_app
from services.core.broker import CONSUMERS
from services.core.telemetry import configure_logging, serve_http

__all__ = ["Aggregator", "run"]

log = logging.getLogger("services.aggregator")


async def run(settings: AggregatorSettings | None = None, stop: asyncio.Event | None = None) -> None:
    settings = settings or AggregatorSettings()
    configure_logging("aggregator", settings.log_level, settings.log_json)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    agg = Aggregator(settings)
    await agg.migrate()
    web = create_app(agg)
    tasks = [asyncio.create_task(serve_http(web, settings.http_host, settings.http_port), name="http")]
    tasks.append(asyncio.create_task(agg.drift.run(stop, settings.drift_interval_s), name="drift"))
    log.info("aggregator web listening", extra={"port": settings.http_port})
    try:
        if await agg.broker.connect_with_retry(stop):
            await agg.consume()
            tasks.append(asyncio.create_task(agg.relay.run(stop), name="relay"))
            tasks.append(asyncio.create_task(agg.sr_loop(stop), name="sr"))
            log.info("aggregator consuming", extra={"queue": CONSUMERS["aggregator"].queue})
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            if task is not stopper and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        log.info("aggregator stopping")
        await agg.broker.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await agg.engine.dispose()
