"""The running labeling service: image.received consumer, finaliser + aggregation loop, outbox relay
and the web app, in one asyncio process run by services/core/runner.py: SIGINT/SIGTERM stop it
gracefully (exit 0), the first component failure stops it with exit 1. After kill -9 nothing is
lost: tasks, judgments and outbox rows are committed before anything is acknowledged."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import Counter, Gauge
from sqlalchemy import func, select, update

from services.core.auth import Account, WebSessions
from services.core.broker import CONSUMERS, Broker
from services.core.db import make_engine, make_sessionmaker, upgrade
from services.core.db.outbox import OutboxRelay
from services.core.priority import lower_cpu_priority
from services.core.runner import Components, ServiceRunner, with_broker
from services.core.telemetry import serve_http
from services.labeling.config import LabelingSettings
from services.labeling.consumer import ImageConsumer
from services.labeling.job import JobDefinition, load_job
from services.labeling.models import Base, Job, Outbox, Task, User
from services.labeling.votes import aggregate_job
from services.labeling.web.routes import WebContext, create_app
from services.labeling.workflow import finalize_due

log = logging.getLogger("services.labeling")
FINALIZED = Counter("pt_labeling_judgments_finalized_total", "Judgments made final (published and aggregated)")
AGGREGATE_CHANGES = Counter("pt_labeling_aggregate_changes_total", "label.aggregated revisions staged")
OPEN_TASKS = Gauge("pt_labeling_open_tasks", "Work images still needing judgments")


async def record_job(sessions: Any, job: JobDefinition) -> None:
    from sqlalchemy.exc import IntegrityError

    for _attempt in range(2):
        async with sessions() as s:
            row = await s.get(Job, job.key)
            if row is None:
                s.add(Job(key=job.key, digest=job.digest(), definition=job.model_dump_json()))
            elif row.digest != job.digest():
                raise RuntimeError(f"job {job.key} changed without a new version: bump `version` in the YAML")
            try:
                await s.commit()
                return
            except IntegrityError:  # a replica starting at the same moment recorded it: check it
                await s.rollback()


class LabelingService:
    """The labeling process's own object: `await start()` / `await stop()` (tests run it in-process):
    the consumer and outbox relay (once the broker answers), the quality loop and the web app."""

    def __init__(self, settings: LabelingSettings | None = None) -> None:
        self.settings = settings or LabelingSettings()
        self.job = load_job(self.settings.labeling_job_file)
        self.engine = make_engine(self.settings.database_url_for("labeling"))
        self.sessions = make_sessionmaker(self.engine)
        self.broker = Broker(self.settings.amqp_url, self.settings.exchange, self.settings.quorum_queues)
        self.relay = OutboxRelay("labeling", self.sessions, Outbox, self.broker)
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._broker_ready = False
        self.components = Components(self._stop)

    def wake(self) -> None:
        self._wake.set()
        self.relay.notify()

    async def health(self) -> dict[str, Any]:
        async with self.sessions() as s:
            await s.scalar(select(func.count()).select_from(Task))
        return {"database": True, "broker": self.broker.is_connected and self._broker_ready}

    async def account_by_name(self, name: str) -> Account | None:
        async with self.sessions() as s:
            row = await s.scalar(select(User).where(User.name == name[:100]))
        return None if row is None else Account(str(row.id), row.role, row.name, row.password_hash, row.session_epoch)

    async def account_by_id(self, user_id: str) -> Account | None:
        if not user_id.isdigit() or len(user_id) > 18:
            return None
        async with self.sessions() as s:
            row = await s.get(User, int(user_id))
        return None if row is None else Account(str(row.id), row.role, row.name, row.password_hash, row.session_epoch)

    async def end_sessions(self, user_id: str) -> None:
        """Sign-out: raise the user's session epoch (atomic in the database every replica shares)."""
        if not user_id.isdigit() or len(user_id) > 18:
            return
        async with self.sessions() as s:
            await s.execute(update(User).where(User.id == int(user_id)).values(session_epoch=User.session_epoch + 1))
            await s.commit()

    def web_app(self) -> Any:
        secret = self.settings.resolved_secret_key()
        web_sessions = WebSessions(
            secret,
            "pt_labeling",
            find_account=self.account_by_name,
            load_account=self.account_by_id,
            max_age_s=self.settings.session_max_age_s,
            secure=self.settings.cookie_secure,
            throttle=self.settings.login_throttle(),
            end_sessions=self.end_sessions,
        )
        ctx = WebContext(
            sessions=self.sessions,
            job=self.job,
            render_dir=self.settings.render_dir(),
            max_side=self.settings.labeling_render_max_side,
            lease_s=self.settings.labeling_lease_s,
            on_final=self.wake,
        )
        return create_app(ctx, web_sessions, self.health, max_body_bytes=self.settings.http_max_body_bytes)

    async def start(self, migrate: bool = True) -> LabelingService:
        """Start the components: broker (connect with retry, consume, outbox relay), quality loop,
        web app. The process runner (`main`) migrates first and stops on the first component failure."""
        if migrate:
            await upgrade(self.engine, "labeling", Base.metadata)
        await record_job(self.sessions, self.job)
        web = self.web_app()  # refuses a placeholder PT_SECRET_KEY before anything starts
        self.components.spawn("broker", with_broker(self.broker, self._stop, self._consume_and_relay))
        self.components.spawn("quality", self._quality_loop())
        self.components.spawn("web", serve_http(web, self.settings.http_host, self.settings.labeling_http_port))
        log.info("labeling service started", extra={"port": self.settings.labeling_http_port, "job": self.job.key})
        return self

    async def stop(self) -> None:
        """Stop: components end (the web server finishes its requests), then connections close."""
        self._stop.set()
        await self.components.cancel()
        await self.broker.close()
        await self.engine.dispose()
        log.info("labeling service stopped")

    async def _consume_and_relay(self) -> None:
        consumer = ImageConsumer(
            self.sessions,
            self.job,
            self.settings.render_dir(),
            self.settings.labeling_render_max_side,
            gate_file=self.settings.resolved_gate_file(),
            backfill_crowd=self.settings.labeling_backfill_crowd,
            backfill_sample=self.settings.labeling_backfill_sample,
        )
        await self.broker.consume(CONSUMERS["labeling"], consumer.handle)
        self._broker_ready = True
        await self.relay.run(self._stop)

    async def _quality_loop(self) -> None:
        """Finalise answers whose undo window passed, re-aggregate, publish changes."""
        while True:
            woken = self._wake.is_set()
            self._wake.clear()  # before the work: an answer committed during it wakes the next round
            try:
                async with self.sessions() as s:
                    n = await finalize_due(s, self.settings.labeling_undo_window_s)
                    changed = await aggregate_job(s, self.job) if (n or woken) else 0
                    await s.commit()
                    open_count = await s.scalar(
                        select(func.count()).select_from(Task).where(Task.kind == "work", Task.status == "open")
                    )
                FINALIZED.inc(n)
                AGGREGATE_CHANGES.inc(changed)
                OPEN_TASKS.set(open_count or 0)
                if n or changed:
                    self.relay.notify()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("quality loop failed; retrying")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=0.5)
                await asyncio.sleep(0.2)  # debounce bursts of answers
            except TimeoutError:
                pass


def main() -> None:
    """The labeling process (services/core/runner.py: logging, signals, migrations, exit code)."""
    settings = LabelingSettings()

    async def start(runner: ServiceRunner) -> Callable[[], Awaitable[None]]:
        # first, before the service starts its threads (they inherit it), with logging configured
        applied = lower_cpu_priority(settings.labeling_cpu_nice)
        runner.log.info("cpu priority", extra={"nice": applied.thread_nice, "autogroup_nice": applied.autogroup_nice})
        service = LabelingService(settings)
        await runner.migrate(service.engine, "labeling", Base.metadata)
        return await runner.start_service(service)

    ServiceRunner("labeling", settings).main(start)
