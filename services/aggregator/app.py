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

import logging
from collections.abc import Awaitable, Callable

from services.aggregator.config import AggregatorSettings
from services.aggregator.models import Base
from services.aggregator.service import Aggregator
from services.aggregator.web.app import create_app
from services.core.broker import CONSUMERS
from services.core.runner import ServiceRunner, with_broker
from services.core.telemetry import serve_http

__all__ = ["Aggregator", "main"]

log = logging.getLogger("services.aggregator")


def main(settings: AggregatorSettings | None = None) -> None:
    settings = settings or AggregatorSettings()

    async def start(runner: ServiceRunner) -> Callable[[], Awaitable[None]]:
        agg = Aggregator(settings)
        await runner.migrate(agg.engine, "aggregator", Base.metadata)
        web = create_app(agg)  # refuses a placeholder PT_SECRET_KEY before anything listens
        runner.spawn("http", serve_http(web, settings.http_host, settings.http_port))
        runner.spawn("drift", agg.drift.run(runner.stop, settings.drift_interval_s))
        log.info("aggregator web listening", extra={"port": settings.http_port})

        async def consume_and_relay() -> None:
            await agg.consume()
            runner.spawn("sr", agg.sr_loop(runner.stop))
            log.info("aggregator consuming", extra={"queue": CONSUMERS["aggregator"].queue})
            await agg.relay.run(runner.stop)

        runner.spawn("broker", with_broker(agg.broker, runner.stop, consume_and_relay))

        async def stop() -> None:
            await agg.broker.close()  # no new deliveries; in-flight handlers end first
            await runner.components.cancel()
            await agg.engine.dispose()

        return stop

    ServiceRunner("aggregator", settings).main(start)
