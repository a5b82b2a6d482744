"""The aggregator service object: consumer of aggregator.events, outbox relay (triage.updated), SR
sender, drift monitor and health. `app.py` wires it to the web worklist / JSON API / FHIR
(`web/app.py`) and runs them as one asyncio process.

Safe under kill -9: an event is acked only after the transaction that applied it (and staged its
triage.updated + SR delivery) committed; a redelivery recomputes the same result and changes
nothing. SIGINT/SIGTERM stop consuming, let in-flight handlers finish and exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import zlib
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from services.aggregator.config import AggregatorSettings
from services.aggregator.drift import DriftConfig, DriftMonitor
from services.aggregator.flags import PENDING, SR_AT_ONCE
from services.aggregator.models import (
    Base,
    Image,
    LabelAggregateRow,
    Outbox,
    PredictionRow,
    SrDelivery,
    SrDeliveryObject,
    SrSend,
    Study,
)
from services.aggregator.policy import Policy
from services.aggregator.report import StudyReport
from services.aggregator.site_calibration import load_active
from services.aggregator.sr import Destination, SopRef, build_sr, encode_sr
from services.aggregator.sr_delivery import (
    SR_OLDEST_AGE,
    SR_PENDING,
    SR_SENT,
    BatchResult,
    DestinationBreaker,
    Timeouts,
    send_batch,
)
from services.aggregator.stored_images import read_header
from services.aggregator.triage_store import FLAGS_SET, REFUSALS, TIME_TO_FIRST_FLAG, Change, TriageStore, as_utc
from services.core.broker import CONSUMERS, Broker, Envelope, PermanentError
from services.core.contracts import ImageRejected
from services.core.db import make_engine, make_sessionmaker, upgrade
from services.core.db.outbox import OutboxRelay, utcnow
from services.core.telemetry import bound_correlation_id

log = logging.getLogger("services.aggregator")
LOCK_STRIPES = 64
SR_SENDER_LOCK = 0x5054_5352  # "PTSR": pg advisory lock key of the SR sender


class Aggregator:
    """State shared by the consumer, the relay, the SR sender and the web app."""

    def __init__(self, settings: AggregatorSettings, engine: AsyncEngine | None = None) -> None:
        self.settings = settings
        self.engine = engine or make_engine(settings.database_url_for("aggregator"))
        self.sessions: async_sessionmaker[AsyncSession] = make_sessionmaker(self.engine)
        self.policy = Policy.load(settings.policy_file)
        # One or several PACS the SRs go to, each with its own queue, breaker and sender loop.
        self.destinations: list[Destination] = Destination.parse_list(settings.sr_destination)
        self.store = TriageStore(
            self.policy,
            sr_enabled=bool(self.destinations),
            sr_settle_s=settings.sr_settle_s,
            backfill_sr=settings.backfill_sr,
        )
        self.site = load_active(settings.resolved_site_calibration_dir())
        if self.site is not None:  # this site's recalibration: its probabilities and thresholds
            self.policy.thresholds = self.site.thresholds
            self.store.site = self.site
        self.broker = Broker(settings.amqp_url, settings.exchange, settings.quorum_queues)
        self.relay = OutboxRelay("aggregator", self.sessions, Outbox, self.broker)
        # SQLite has one writer: concurrent handlers would only contend in its busy-wait (slow), so
        # they take turns in-process. PostgreSQL: one lock stripe per study hash, plus the row lock.
        stripes = 1 if self.engine.dialect.name == "sqlite" else LOCK_STRIPES
        self._locks = [asyncio.Lock() for _ in range(stripes)]
        self._sr_wake = asyncio.Event()
        self._sr_next_due: datetime | None = None  # the earliest held SR revision's settle deadline
        self._sr_breakers: dict[Destination, DestinationBreaker] = {}  # one circuit breaker per destination
        self._sr_dest_wake: list[asyncio.Event] = []  # per destination (sr_loop): frozen SRs to send
        self._sr_sends_checked = False  # the freezer's one repair pass (_queue_missing_sends) is done
        self.sr_timeouts = Timeouts(
            settings.sr_connect_timeout_s, settings.sr_acse_timeout_s, settings.sr_dimse_timeout_s
        )
        self.drift = DriftMonitor(
            self.sessions,
            DriftConfig(
                settings.drift_reference_dir,
                settings.drift_window,
                settings.drift_min_n,
                settings.drift_psi_alarm,
                settings.drift_rate_z,
            ),
        )

    @property
    def destination(self) -> Destination | None:
        """The first SR destination (None: no SR destination)."""
        return self.destinations[0] if self.destinations else None

    @destination.setter
    def destination(self, dest: Destination) -> None:
        """Point the first destination elsewhere, keeping its name: what waits for it follows."""
        key = self.destinations[0].key if self.destinations else dest.key
        self.destinations[:1] = [replace(dest, name=key)]

    def breaker(self, dest: Destination) -> DestinationBreaker:
        """The destination's circuit breaker."""
        if dest not in self._sr_breakers:
            self._sr_breakers[dest] = DestinationBreaker(
                dest, self.settings.sr_retry_seconds, self.settings.sr_backoff_max_s
            )
        return self._sr_breakers[dest]

    @property
    def sr_breaker(self) -> DestinationBreaker | None:
        """The first destination's circuit breaker (None: no SR destination)."""
        return self.breaker(self.destinations[0]) if self.destinations else None

    def lock_for(self, study_uid: str) -> asyncio.Lock:
        """Events of one study are applied one at a time (in this process; the DB guards replicas)."""
        digest = hashlib.blake2b(study_uid.encode(), digest_size=4).digest()
        return self._locks[int.from_bytes(digest, "big") % len(self._locks)]

    async def migrate(self) -> None:
        await upgrade(self.engine, "aggregator", Base.metadata)

    # ---- consumer ----------------------------------------------------------------------------
    async def consume(self) -> None:
        """Consume aggregator.events in batches (one transaction per batch; see Broker.consume_batch)."""
        s = self.settings
        await self.broker.consume_batch(
            CONSUMERS["aggregator"],
            self.handle,
            self.handle_batch,
            prefetch=s.prefetch,
            max_batch=s.max_batch,
            max_wait_s=s.max_wait_s,
        )

    async def handle(self, env: Envelope) -> None:
        """Apply one event in its own transaction."""
        await self.handle_batch([env])

    async def handle_batch(self, envs: list[Envelope]) -> None:
        """Apply events in delivery order in one transaction; the broker acks them after it commits.

        An image ingest refused before it knew the study (a CT, an SR, an unreadable data set) is
        an expected outcome: it is recorded and counted as a refusal, not dead-lettered. A refusal
        that names its study also marks that study's image NOT_TRIAGED.
        """
        refusals: list[ImageRejected] = []
        events: list[tuple[Any, str]] = []
        correlation_ids: list[str | None] = []
        for env in envs:
            payload: Any = env.payload
            ref = payload.image
            if isinstance(payload, ImageRejected):
                refusals.append(payload)
                if not ref.study_instance_uid:
                    continue
            if not ref.study_instance_uid or not ref.sop_instance_uid:
                raise PermanentError(f"{env.routing_key} without study or SOP instance UID")
            events.append((payload, env.message_id or env.routing_key))
            correlation_ids.append(env.correlation_id or ref.sop_instance_uid)
        async with self._writer(), self.sessions() as session:
            new_refusals = await self.store.record_refusals(session, refusals)
            changes = await self.store.apply_batch(session, events)
            await session.commit()
        for refusal in new_refusals:
            REFUSALS.labels(refusal.reason_code or "unknown").inc()
        if new_refusals:
            log.info("images refused by ingest recorded", extra={"count": len(new_refusals)})
        for change, correlation_id in zip(changes, correlation_ids, strict=True):
            with bound_correlation_id(correlation_id):  # log lines follow the image, as in every service
                self.after_commit(change)

    def _writer(self) -> contextlib.AbstractAsyncContextManager[Any]:
        """SQLite: take the writer's turn in this process (its one writer lock would otherwise be
        fought over in a busy-wait). PostgreSQL: nothing here, the study row locks order writers."""
        if self.engine.dialect.name == "sqlite":
            return self._locks[0]
        return contextlib.nullcontext()

    def after_commit(self, change: Change | None) -> None:
        if change is None:
            return
        FLAGS_SET.labels(change.flag, change.source).inc()
        if change.first_flag_seconds is not None:
            TIME_TO_FIRST_FLAG.observe(change.first_flag_seconds)
        log.info(
            "triage updated",
            extra={"study_uid": change.study_uid, "flag": change.flag, "previous": change.previous_flag},
        )
        self.relay.notify()
        if change.sr_queued:
            self._sr_wake.set()

    async def review(self, study_uid: str, reviewer: str, action: str, flag: str | None, comment: str) -> Change:
        async with self.lock_for(study_uid), self.sessions() as session:
            change = await self.store.review(session, study_uid, reviewer, action, flag, comment)
            await session.commit()
        self.after_commit(change)
        return change

    # ---- SR delivery -------------------------------------------------------------------------
    async def study_report(self, session: AsyncSession, study: Study) -> tuple[StudyReport, Any]:
        report, header, _, _ = await self.study_report_and_evidence(session, study)
        return report, header

    async def study_report_and_evidence(
        self, session: AsyncSession, study: Study
    ) -> tuple[StudyReport, Any, list[SopRef], bool]:
        """The study's report, an image header (patient/study modules), the images it judged (the
        SR's evidence) and whether it is complete: no image awaited (announced but not received, or
        no evidence yet) and no crowd vote awaited (an image's latest label aggregate not complete)."""
        images = (await session.scalars(select(Image).where(Image.study_uid == study.study_uid))).all()
        header = None
        evidence: list[SopRef] = []
        complete = True
        for image in images:
            if image.eligible is None or (image.eligible and image.flag == PENDING):
                complete = False
            if not image.eligible or image.flag == PENDING:  # evidence: the images judged
                continue
            image_header = await asyncio.to_thread(read_header, image.storage_uri)
            if image_header is None:
                continue
            header = header or image_header
            sop_class = str(getattr(image_header, "SOPClassUID", "") or "")
            series_uid = image.series_uid or str(getattr(image_header, "SeriesInstanceUID", "") or "")
            if sop_class and series_uid:  # a reference needs the class: unreadable files are left out
                evidence.append(SopRef(series_uid, sop_class, image.sop_uid))
        sop_uids = sorted(i.sop_uid for i in images)
        if sop_uids:
            aggregates = (
                await session.scalars(select(LabelAggregateRow).where(LabelAggregateRow.sop_uid.in_(sop_uids)))
            ).all()
            latest: dict[str, LabelAggregateRow] = {}
            for agg in aggregates:
                if agg.sop_uid not in latest or agg.revision > latest[agg.sop_uid].revision:
                    latest[agg.sop_uid] = agg
            if any(not agg.complete for agg in latest.values()):
                complete = False
        report = StudyReport(
            study_uid=study.study_uid,
            flag=study.flag,
            p_pneumonia=study.p_pneumonia,
            reason=study.reason,
            revision=study.revision,
            model_version=study.model_version,
            human_judgments=study.human_judgments,
            reviewed=bool(study.overridden_by),
            updated_at=as_utc(study.updated_at) or utcnow(),
            sop_uids=tuple(sop_uids),
            retrospective=study.lane == "backfill",
        )
        return report, header, evidence, complete

    async def send_pending_srs(self) -> int:
        """Freeze the SR revisions that are due, then send what waits for every destination
        (concurrently); the number of SRs the destinations stored. The live service runs the same two
        steps in `sr_loop`, one sender loop per destination.

        No transaction stays open across the network: a short one takes a snapshot (the reports to
        send, older pending revisions of a study superseded) and commits; the C-STOREs run with no
        session; each association's results are recorded in one short transaction. A slow or silent
        PACS (up to the destination's timeouts, services/aggregator/sr_delivery.py) never holds the
        database's write lock, so event handling carries on meanwhile, and never holds up another
        destination.
        """
        if not self.destinations:
            return 0
        await self.freeze_srs()
        return sum(await asyncio.gather(*(self.send_srs_to(dest) for dest in self.destinations)))

    @contextlib.asynccontextmanager
    async def _sender_lock(self, key: int) -> AsyncIterator[bool]:
        """Replicas on PostgreSQL: the row locks of a snapshot end at its commit, before the sends, so
        a session-level advisory lock makes one replica at a time the freezer (and one the sender of
        each destination); the others skip the round. SQLite: one process owns the database."""
        if self.engine.dialect.name != "postgresql":
            yield True
            return
        async with self.engine.connect() as conn:
            got = bool((await conn.execute(text("SELECT pg_try_advisory_lock(:k)"), {"k": key})).scalar())
            await conn.commit()
            try:
                yield got
            finally:
                if got:
                    await conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": key})
                    await conn.commit()

    async def freeze_srs(self) -> None:
        """Freeze the held SR revisions whose settle time has passed (one association's worth per
        round, URGENT first) and queue each frozen SR for every destination."""
        if not self.destinations:
            return
        async with self._sender_lock(SR_SENDER_LOCK) as got:
            if got:
                await self._freeze_srs()

    async def _freeze_srs(self) -> None:
        now = utcnow()
        next_due: datetime | None = None
        async with self.sessions() as session:
            # SKIP LOCKED (PostgreSQL): rows another transaction holds are left to it.
            # Held revisions only (not frozen yet: no SR bytes to load): per study only the newest
            # counts; older ones are superseded.
            held = (
                await session.scalars(
                    select(SrDelivery)
                    .where(SrDelivery.status == "pending", SrDelivery.dataset.is_(None))
                    .order_by(SrDelivery.id)
                    .with_for_update(skip_locked=True)
                )
            ).all()
            latest: dict[str, SrDelivery] = {}
            superseded: list[SrDelivery] = []
            for delivery in held:
                if delivery.study_uid in latest:
                    superseded.append(latest[delivery.study_uid])
                latest[delivery.study_uid] = delivery
            # At most one association's worth is frozen per round (URGENT first), so a large backlog
            # (after an outage, a catch-up) starts going out at once instead of after every SR of it
            # was built in one long transaction; the sender comes back at once for the rest.
            freeze_cap, frozen_now = max(1, self.settings.sr_batch_size), 0
            with session.no_autoflush:  # reads only until the snapshot is taken
                for delivery in sorted(latest.values(), key=lambda d: (d.flag not in SR_AT_ONCE, d.id)):
                    due = as_utc(delivery.due_at) or now
                    if due > now:  # still settling: a flip within it replaces this revision
                        next_due = due if next_due is None else min(next_due, due)
                        continue
                    if frozen_now >= freeze_cap:  # due, frozen in the next round
                        next_due = now
                        continue
                    study = await session.get(Study, delivery.study_uid)
                    if study is None:
                        superseded.append(delivery)
                        continue
                    previous = (
                        await session.scalars(
                            select(SrDelivery)
                            .where(
                                SrDelivery.study_uid == delivery.study_uid,
                                SrDelivery.dataset.is_not(None),
                                SrDelivery.status.in_(("pending", "sent")),
                            )
                            .order_by(SrDelivery.revision.desc())
                            .limit(1)
                        )
                    ).first()
                    if previous is not None and (previous.flag, previous.verified) == (
                        delivery.flag,
                        delivery.verified,
                    ):  # undone within the settle time: the PACS already has (or will get) this
                        superseded.append(delivery)
                        continue
                    report, header, evidence, complete = await self.study_report_and_evidence(session, study)
                    report = replace(report, revision=delivery.revision)
                    ds = build_sr(
                        report,
                        header,
                        predecessor_sop_uid=previous.sop_uid if previous is not None else "",
                        evidence=evidence,
                        complete=complete,
                        verified_by=(study.overridden_by or "") if delivery.verified else "",
                    )
                    delivery.dataset = encode_sr(ds)  # frozen: every attempt sends these bytes
                    frozen_now += 1
                    delivery.sop_uid = str(ds.SOPInstanceUID)
                    delivery.predecessor_sop_uid = previous.sop_uid if previous is not None else ""
                    if self.settings.send_heatmap_sc:  # frozen with the SR, sent before it
                        for sop_uid, sop_class, data in await self.heatmap_scs(session, study, delivery.revision):
                            session.add(
                                SrDeliveryObject(
                                    delivery_id=delivery.id, sop_uid=sop_uid, sop_class_uid=sop_class, dataset=data
                                )
                            )
            for delivery in superseded:
                delivery.status = "superseded"
            # Each SR frozen now is queued for every destination (aggregator_sr_sends).
            for delivery in held:
                if delivery.status == "pending" and delivery.dataset is not None:
                    for dest in self.destinations:
                        session.add(SrSend(delivery_id=delivery.id, destination=dest.key, created_at=now))
            if not self._sr_sends_checked:  # once per start: SRs frozen before an upgrade or before
                await self._queue_missing_sends(session, now)  # a destination was added
            await session.commit()
        self._sr_sends_checked = True
        self._sr_next_due = next_due

    async def _queue_missing_sends(self, session: AsyncSession, now: datetime) -> None:
        """Frozen SRs not sent yet that some configured destination has no send for."""
        for dest in self.destinations:
            queued = select(SrSend.id).where(SrSend.delivery_id == SrDelivery.id, SrSend.destination == dest.key)
            missing = await session.scalars(
                select(SrDelivery.id).where(
                    SrDelivery.status == "pending", SrDelivery.dataset.is_not(None), ~queued.exists()
                )
            )
            for delivery_id in missing:
                session.add(SrSend(delivery_id=delivery_id, destination=dest.key, created_at=now))

    async def send_srs_to(self, dest: Destination) -> int:
        """Send one association's worth (PT_AGGREGATOR_SR_BATCH_SIZE) of the frozen SRs waiting for one
        destination, URGENT studies first; the number it stored. Its sender loop comes back at once
        while more wait, so an URGENT result frozen meanwhile goes in the next association, not after
        the whole backlog. Nothing is attempted while the breaker is open."""
        lock = (SR_SENDER_LOCK << 32) | zlib.crc32(dest.key.encode())
        async with self._sender_lock(lock) as got:
            return await self._send_srs_to(dest) if got else 0

    async def _send_srs_to(self, dest: Destination) -> int:
        breaker = self.breaker(dest)
        if not breaker.may_attempt():  # breaker open: no attempt until its back-off ends
            await self.refresh_sr_gauges(dest)
            return 0
        async with self.sessions() as session:
            jobs = (
                await session.execute(
                    select(SrSend.id, SrDelivery.id, SrDelivery.study_uid, SrDelivery.dataset, SrDelivery.flag)
                    .join(SrDelivery, SrDelivery.id == SrSend.delivery_id)
                    .where(SrSend.destination == dest.key, SrSend.status == "pending", SrDelivery.dataset.is_not(None))
                    .order_by(SrDelivery.id)
                )
            ).all()
            extras: dict[int, list[bytes]] = {}  # by delivery id
            if jobs:
                for obj in await session.scalars(
                    select(SrDeliveryObject)
                    .where(SrDeliveryObject.delivery_id.in_([j[1] for j in jobs]))
                    .order_by(SrDeliveryObject.id)
                ):
                    extras.setdefault(obj.delivery_id, []).append(obj.dataset)
        if not jobs:
            await self.refresh_sr_gauges(dest)
            return 0
        delivery_of = {j[0]: j[1] for j in jobs}
        # URGENT studies first, then queue order; each study's chain stays in order.
        by_study: dict[str, list[Any]] = {}
        for job in jobs:
            by_study.setdefault(job[2], []).append(job)
        studies = sorted(by_study.values(), key=lambda js: (not any(j[4] in SR_AT_ONCE for j in js), js[0][1]))
        ordered = [(j[0], j[3]) for js in studies for j in js]  # (send id, frozen SR)
        batch = ordered[: max(1, self.settings.sr_batch_size)]
        batch_extras = {i: extras[delivery_of[i]] for i, _ in batch if delivery_of[i] in extras}
        result = await asyncio.to_thread(
            send_batch, batch, dest, self.settings.sr_calling_ae, self.sr_timeouts, batch_extras
        )
        if result.skipped_objects:
            log.warning(
                "SR destination accepts no Secondary Capture: heatmaps not sent",
                extra={"destination": breaker.label, "skipped": result.skipped_objects},
            )
        await self._record_sends(dest, batch, result)
        SR_SENT.labels(breaker.label).inc(len(result.sent))
        pending = await self.refresh_sr_gauges(dest)
        if result.reason is not None:
            breaker.failure(result, pending)
        else:
            breaker.success(pending)
        return len(result.sent)

    async def _record_sends(self, dest: Destination, batch: list[tuple[int, bytes]], result: BatchResult) -> None:
        """One association's outcome, in one short transaction: each send sent or failed; a delivery
        is sent once every destination has it."""
        now = utcnow()
        error = f"{result.reason}: {result.detail}"
        if len(self.destinations) > 1:
            error += f" (destination {dest.key})"
        async with self.sessions() as session:
            touched: set[int] = set()
            for send_id in result.sent:
                send = await session.get(SrSend, send_id)
                if send is not None:
                    send.attempts += 1
                    send.status, send.sent_at = "sent", now
                    touched.add(send.delivery_id)
                    delivery = await session.get(SrDelivery, send.delivery_id)
                    if delivery is not None:
                        delivery.attempts += 1
            if result.reason is not None:  # the SR whose C-STORE failed, or the whole batch
                tried = [result.failed_id] if result.failed_id is not None else [i for i, _ in batch]
                for send_id in tried:
                    send = await session.get(SrSend, send_id)
                    if send is None:
                        continue
                    send.attempts += 1
                    send.last_error = error[:1000]
                    delivery = await session.get(SrDelivery, send.delivery_id)
                    if delivery is not None:
                        delivery.attempts += 1
                        delivery.last_error = error[:1000]
            await session.flush()
            waiting = set(
                await session.scalars(
                    select(SrSend.delivery_id).where(SrSend.delivery_id.in_(touched), SrSend.status != "sent")
                )
            )
            for delivery_id in touched - waiting:  # every destination has it now
                delivery = await session.get(SrDelivery, delivery_id)
                if delivery is not None:
                    delivery.status, delivery.sent_at = "sent", now
            await session.commit()

    async def heatmap_scs(self, session: AsyncSession, study: Study, revision: int) -> list[tuple[str, str, bytes]]:
        """(SOP instance UID, SOP class UID, Part 10 bytes) of a heatmap Secondary Capture per judged
        image of the study (heatmap_sc.py), for the SR revision `revision`. An image whose file
        cannot be read is left out; one without a heatmap gets the X-ray and the result only."""
        from services.aggregator.heatmap_sc import SECONDARY_CAPTURE, build_heatmap_sc, encode_sc
        from services.aggregator.stored_images import heatmap_png, path_of
        from services.core.imaging import read_dicom

        images = (
            await session.scalars(select(Image).where(Image.study_uid == study.study_uid).order_by(Image.sop_uid))
        ).all()
        out: list[tuple[str, str, bytes]] = []
        for number, image in enumerate((i for i in images if i.eligible and i.flag != PENDING), start=1):
            path = path_of(image.storage_uri)
            if path is None or not path.is_file():
                continue
            pred = (
                await session.scalars(
                    select(PredictionRow)
                    .where(PredictionRow.sop_uid == image.sop_uid, PredictionRow.superseded_by == "")
                    .order_by(PredictionRow.id.desc())
                    .limit(1)
                )
            ).first()
            heatmap_path = path_of(pred.heatmap_uri) if pred is not None and pred.heatmap_uri else None
            version = (pred.model_version if pred is not None else "") or study.model_version

            def build(
                path: Any = path,
                heatmap_path: Any = heatmap_path,
                image: Image = image,
                n: int = number,
                v: str = version,
            ) -> Any:
                try:
                    source = read_dicom(path)
                    heatmap = None
                    if heatmap_path is not None and heatmap_path.is_file():
                        heatmap = heatmap_png(str(heatmap_path), heatmap_path.stat().st_mtime)
                    ds = build_heatmap_sc(
                        source,
                        heatmap,
                        flag=image.flag,
                        p_pneumonia=image.p_fused,
                        model_version=v,
                        revision=revision,
                        instance_number=n,
                    )
                    return str(ds.SOPInstanceUID), encode_sc(ds)
                except Exception as exc:  # an unreadable file must not hold the SR back
                    log.warning("heatmap SC not built", extra={"error": repr(exc)[:300]})
                    return None

            built = await asyncio.to_thread(build)
            if built is not None:
                out.append((built[0], SECONDARY_CAPTURE, built[1]))
        return out

    async def sr_backlogs(self, dests: list[Destination]) -> dict[str, tuple[int, float]]:
        """Per destination key: SRs not sent to it yet (held revisions, which every destination will
        get, and frozen ones waiting for it) and the age (seconds) of the oldest. Two queries."""
        async with self.sessions() as session:
            held, held_oldest = (
                await session.execute(
                    select(func.count(SrDelivery.id), func.min(SrDelivery.created_at)).where(
                        SrDelivery.status == "pending", SrDelivery.dataset.is_(None)
                    )
                )
            ).one()
            waiting = {
                key: (n, oldest)
                for key, n, oldest in await session.execute(
                    select(SrSend.destination, func.count(SrSend.id), func.min(SrDelivery.created_at))
                    .join(SrDelivery, SrDelivery.id == SrSend.delivery_id)
                    .where(SrSend.destination.in_([d.key for d in dests]), SrSend.status == "pending")
                    .group_by(SrSend.destination)
                )
            }
        now = utcnow()
        out: dict[str, tuple[int, float]] = {}
        for dest in dests:
            n, oldest = waiting.get(dest.key, (0, None))
            count = int(held or 0) + int(n or 0)
            stamps = [t for t in (as_utc(held_oldest), as_utc(oldest)) if t is not None]
            out[dest.key] = (count, max(0.0, (now - min(stamps)).total_seconds()) if count and stamps else 0.0)
        return out

    async def refresh_sr_gauges(self, only: Destination | None = None) -> int:
        """Per destination (all, or `only`): SRs pending and the age of the oldest; the pending count
        of `only`, or the most of any."""
        dests = [only] if only is not None else self.destinations
        backlogs = await self.sr_backlogs(dests) if dests else {}
        for dest in dests:
            count, age = backlogs[dest.key]
            SR_PENDING.labels(dest.label).set(count)
            SR_OLDEST_AGE.labels(dest.label).set(age)
        return max((count for count, _ in backlogs.values()), default=0)

    async def sr_health(self) -> dict[str, Any]:
        """Degraded while any destination's oldest SR not sent is older than
        PT_AGGREGATOR_SR_HEALTH_MAX_AGE_S. The top-level fields are the worst destination's; each is
        listed under `destinations`."""
        limit = self.settings.sr_health_max_age_s
        per: list[dict[str, Any]] = []
        backlogs = await self.sr_backlogs(self.destinations)
        for dest in self.destinations:
            count, age = backlogs[dest.key]
            breaker = self.breaker(dest)
            per.append(
                {
                    "ok": age <= limit,
                    # results not reaching this PACS (worklist banner, ops page): too old, or the
                    # breaker open with SRs waiting
                    "degraded": age > limit or (breaker.state != "closed" and count > 0),
                    "pending": count,
                    "oldest_pending_s": round(age, 1),
                    "name": dest.key,
                    **breaker.describe(),
                }
            )
        worst = max(per, key=lambda d: (not d["ok"], d["degraded"], d["oldest_pending_s"]))
        return {
            **worst,
            "ok": all(d["ok"] for d in per),
            "critical": False,  # the worklist stays served (and ready) while a PACS is down
            "max_age_s": limit,
            "destinations": per,
        }

    async def sr_loop(self, stop: asyncio.Event) -> None:
        """Freeze due SR revisions when woken (a new flag) or when the earliest held one settles; one
        sender loop per destination sends what waits for it, so a silent or rejecting PACS never holds
        up another destination or the freezing of new results."""
        if not self.destinations:
            await stop.wait()
            return
        self._sr_dest_wake = [asyncio.Event() for _ in self.destinations]
        senders: list[asyncio.Task[None]] = []
        try:
            while not stop.is_set():
                self._sr_wake.clear()  # before the work: a wake-up during a round is served at once
                try:
                    await self.freeze_srs()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("SR freezer failed", extra={"error": repr(exc)})
                if not senders:  # after the first freeze: what is due now (URGENT first) goes first
                    senders = [
                        asyncio.create_task(self._destination_loop(i, wake, stop))
                        for i, wake in enumerate(self._sr_dest_wake)
                    ]
                for wake in self._sr_dest_wake:
                    wake.set()
                timeout = self.settings.sr_retry_seconds
                if self._sr_next_due is not None:  # wake when the earliest held revision has settled
                    timeout = min(timeout, max(0.05, (self._sr_next_due - utcnow()).total_seconds()))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._sr_wake.wait(), timeout=timeout)
        finally:
            for wake in self._sr_dest_wake:
                wake.set()
            await asyncio.gather(*senders, return_exceptions=True)

    async def _destination_loop(self, index: int, wake: asyncio.Event, stop: asyncio.Event) -> None:
        batch = max(1, self.settings.sr_batch_size)
        while not stop.is_set():
            wake.clear()
            dest = self.destinations[index]
            sent = 0
            try:
                sent = await self.send_srs_to(dest)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("SR sender failed", extra={"error": repr(exc), "destination": dest.label})
            breaker = self.breaker(dest)
            timeout = self.settings.sr_retry_seconds
            if sent >= batch:  # a full association: more may wait, the next one at once
                timeout = 0.0
            elif breaker.state != "closed":  # the half-open probe
                timeout = min(timeout, max(0.05, breaker.seconds_to_attempt()))
            if timeout > 0:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), timeout=timeout)

    # ---- health ------------------------------------------------------------------------------
    async def health(self) -> dict[str, Any]:
        db_ok = True
        try:
            async with self.sessions() as session:
                await session.execute(text("SELECT 1"))
        except Exception:
            db_ok = False
        checks: dict[str, Any] = {
            "database": db_ok,
            "broker": self.broker.is_connected,
            "outbox_backlog": {"ok": True, "value": await self.relay.backlog() if db_ok else None},
        }
        if self.destinations and db_ok:
            checks["sr_delivery"] = await self.sr_health()
        return checks
