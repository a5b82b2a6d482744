"""The running aggregator — the composition root: the service object (`service.py`), the web
worklist / JSON API / FHIR (`web/app.py`) on PT_AGGREGATOR_HTTP_PORT, and the consumer, outbox relay,
SR sender and drift monitor, in one asyncio process run by services/core/runner.py (logging,
signals, migrations, exit code). Nothing imports this module but the CLI.

Safe under kill -9: an event is acked only after the transaction that applied it (and staged its
triage.updated + SR delivery) committed; a redelivery recomputes the same result and changes
nothing. SIGINT/SIGTERM stop consuming, let in-flight handlers finish and exit 0; the first
component that fails (web server, drift monitor, consumer, relay, SR sender) stops it with exit 1.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from services.aggregator.config import AggregatorSettings
from services.aggregator.models import Base
from services.aggregator.service import Aggregator
from services.aggregator.web.app import create_app
from services.core.broker import CONSUMERS
from services.core.runner import Components, ServiceRunner, with_broker
from services.core.telemetry import serve_http

__all__ = ["Aggregator", "AggregatorService", "main"]

log = logging.getLogger("services.aggregator")


class AggregatorService:
    """The aggregator process's own object (`Aggregator` plus its components): the web app, the drift
    monitor and, once the broker answers, the consumer, the outbox relay and the SR sender."""

    def __init__(self, settings: AggregatorSettings) -> None:
        self.settings = settings
        self.agg = Aggregator(settings)
        self.engine = self.agg.engine
        self._stop = asyncio.Event()
        self.components = Components(self._stop)

    async def start(self, migrate: bool = True) -> AggregatorService:
        if migrate:
            await self.agg.migrate()
        s, agg, stop = self.settings, self.agg, self._stop
        web = create_app(agg)  # refuses a placeholder PT_SECRET_KEY before anything listens
        self.components.spawn("http", serve_http(web, s.http_host, s.http_port))
        self.components.spawn("drift", agg.drift.run(stop, s.drift_interval_s))
        log.info("aggregator web listening", extra={"port": s.http_port})

        async def consume_and_relay() -> None:
            await agg.consume()
            self.components.spawn("sr", agg.sr_loop(stop))
            log.info("aggregator consuming", extra={"queue": CONSUMERS["aggregator"].queue})
            await agg.relay.run(stop)

        self.components.spawn("broker", with_broker(agg.broker, stop, consume_and_relay))
        return self

    async def stop(self) -> None:
        self._stop.set()
        await self.agg.broker.close()  # no new deliveries; in-flight handlers end first
        await self.components.cancel()
        await self.agg.engine.dispose()


def main(settings: AggregatorSettings | None = None) -> None:
    settings = settings or AggregatorSettings()

    async def start(runner: ServiceRunner) -> Callable[[], Awaitable[None]]:
        service = AggregatorService(settings)
        await runner.migrate(service.engine, "aggregator", Base.metadata)
        return await runner.start_service(service)

    ServiceRunner("aggregator", settings).main(start)
