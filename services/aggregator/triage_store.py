"""Evidence in the aggregator's DB, and the study result recomputed from it.

Every event is applied in one transaction that also recomputes the study's result; when the result
changes, the same transaction adds the audit-trail row, the `triage.updated` outbox event and (when
an SR destination is configured) the SR delivery. Applying an event twice changes nothing: each
write is keyed (judgment id, SOP + model + version, SOP + aggregate revision), so a redelivered or
duplicated event recomputes the same result and no new revision is made. Events may come in any
order: whichever arrives first creates the study and image rows.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from google.protobuf.timestamp_pb2 import Timestamp
from prometheus_client import Counter, Histogram
from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.aggregator.flags import FLAGS, MEANS, NOT_TRIAGED, PENDING, PROTO, SR_AT_ONCE, URGENCY
from services.aggregator.fusion import Evidence, Vote
from services.aggregator.models import (
    Image,
    JudgmentRow,
    LabelAggregateRow,
    Outbox,
    PredictionRow,
    Refusal,
    Review,
    SrDelivery,
    Study,
    TriageHistory,
)
from services.aggregator.policy import ImageResult, Policy, study_result
from services.core.broker import PermanentError
from services.core.contracts import (
    Answer,
    Confidence,
    ImageReceived,
    ImageRef,
    ImageRejected,
    Judgment,
    LabelAggregate,
    Prediction,
    TriageUpdated,
)
from services.core.db.outbox import add_event, utcnow
from services.core.lanes import FRESH
from services.core.lanes import normalise as normalise_lane

TIME_TO_FIRST_FLAG = Histogram(
    "pt_aggregator_time_to_first_flag_seconds",
    "From the study's first image received by ingest to its first triage flag",
    buckets=(0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600, 4 * 3600, 24 * 3600),
)
FLAGS_SET = Counter("pt_aggregator_flags_total", "Study flag changes, by the new flag and source", ["flag", "source"])
OVERRIDES = Counter("pt_aggregator_overrides_total", "Clinician reviews, by action", ["action"])
REFUSALS = Counter(
    "pt_aggregator_refusals_total",
    "Images ingest refused (image.rejected, counted once per SOP instance and reason), by reason code",
    ["reason"],
)
EVENTS = Counter("pt_aggregator_events_total", "Events applied, by kind and outcome", ["kind", "outcome"])

ANSWER_NAMES = {
    Answer.ANSWER_PNEUMONIA: "pneumonia",
    Answer.ANSWER_HEALTHY: "healthy",
    Answer.ANSWER_CANT_TELL: "cant_tell",
}
CONFIDENCE_NAMES = {Confidence.CONFIDENCE_SURE: "sure", Confidence.CONFIDENCE_PROBABLY: "probably"}


def _insert_for(s: AsyncSession) -> Any:
    """The dialect's INSERT (PostgreSQL or SQLite), which has ON CONFLICT DO NOTHING."""
    if s.get_bind().dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes: they are UTC."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def from_timestamp(ts: Timestamp) -> datetime | None:
    if ts.seconds == 0 and ts.nanos == 0:
        return None
    return ts.ToDatetime(tzinfo=UTC)


def version_key(version: str) -> tuple[tuple[int, int | str], ...]:
    """Natural order of model versions: "2" < "10", "v1.9" < "v1.10"."""
    parts = re.findall(r"\d+|[^\d]+", version or "")
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)


@dataclass
class Change:
    """What a transaction changed in a study's result (None: nothing visible changed)."""

    study_uid: str
    flag: str
    previous_flag: str
    revision: int
    source: str = "policy"
    first_flag_seconds: float | None = None
    sr_queued: bool = False


@dataclass
class WorkingSet:
    """The rows one transaction reads and writes, loaded up front with one query per table.

    Events are then applied and their studies recomputed in memory; new and changed rows go to the
    database when the caller commits. A batch of events costs a handful of round trips instead of a
    dozen per event, and gives the same rows, revisions and audit trail as applying them one by one.
    """

    studies: dict[str, Study] = field(default_factory=dict)
    images: dict[str, Image] = field(default_factory=dict)
    study_images: dict[str, list[Image]] = field(default_factory=dict)
    predictions: dict[str, dict[tuple[str, str], PredictionRow]] = field(default_factory=dict)
    judgments: dict[str, dict[str, JudgmentRow]] = field(default_factory=dict)
    judgment_ids: set[str] = field(default_factory=set)
    aggregates: dict[str, dict[int, LabelAggregateRow]] = field(default_factory=dict)

    def add_image(self, image: Image) -> None:
        self.images[image.sop_uid] = image
        self.study_images.setdefault(image.study_uid, []).append(image)

    def add_prediction(self, row: PredictionRow) -> None:
        self.predictions.setdefault(row.sop_uid, {})[(row.model_name, row.model_version)] = row

    def add_judgment(self, row: JudgmentRow) -> None:
        self.judgments.setdefault(row.sop_uid, {})[row.judgment_id] = row
        self.judgment_ids.add(row.judgment_id)

    def add_aggregate(self, row: LabelAggregateRow) -> None:
        self.aggregates.setdefault(row.sop_uid, {})[row.revision] = row


def pick_prediction(rows: Iterable[PredictionRow]) -> PredictionRow | None:
    """The current prediction of an image: the newest model version, then the latest made; a
    prediction a re-score superseded (its version was withdrawn) no longer counts."""
    rows = list(rows)
    live = [r for r in rows if not r.superseded_by] or rows
    return max(
        live, key=lambda r: (version_key(r.model_version), as_utc(r.predicted_at) or as_utc(r.stored_at)), default=None
    )


def rescore_note(payload: Any) -> str:
    """The audit trail's words for a re-score prediction ("" for any other event)."""
    if not isinstance(payload, Prediction) or not payload.rescore_of_model_version:
        return ""
    why = payload.rescore_reason or f"model version {payload.rescore_of_model_version} withdrawn"
    return (
        f"re-scored by model version {payload.model_version}, replacing version"
        f" {payload.rescore_of_model_version} ({why})"
    )


def received_at_of(payload: Any) -> datetime | None:
    received = getattr(payload, "received_at", None)
    return from_timestamp(received) if received is not None else None


def new_image(ref: ImageRef) -> Image:
    """An image row with every default set in Python (it is read before it is flushed)."""
    return Image(
        sop_uid=ref.sop_instance_uid,
        study_uid=ref.study_instance_uid,
        series_uid="",
        storage_uri="",
        sha256="",
        eligible=None,
        not_triaged_reason="",
        outside_intended_use=False,
        intended_use_note="",
        view_position="",
        patient_age_years=-1,
        received_at=None,
        p_fused=None,
        flag=PENDING,
        reason="",
    )


class TriageStore:
    def __init__(
        self, policy: Policy, sr_enabled: bool = False, sr_settle_s: float = 0.0, backfill_sr: bool = True
    ) -> None:
        self.policy = policy
        self.sr_enabled = sr_enabled
        self.backfill_sr = backfill_sr  # SRs for backfill studies (marked retrospective)
        self.sr_settle_s = sr_settle_s  # how long a new SR revision is held (URGENT: not at all)
        self.site: Any = None  # the active site calibration (services/aggregator/site_calibration.py), if any

    # ---- rows ------------------------------------------------------------------------------------
    async def load(
        self,
        s: AsyncSession,
        study_uids: Collection[str],
        sop_uids: Collection[str] = (),
        judgment_ids: Collection[str] = (),
    ) -> WorkingSet:
        """Read (and on PostgreSQL lock) the studies, their images and the images' evidence."""
        ws = WorkingSet()
        studies, sops, judgment_keys = sorted(study_uids), sorted(sop_uids), sorted(judgment_ids)
        if studies:
            # Row locks (PostgreSQL), taken in one order so that replicas applying batches that share
            # studies wait for each other instead of deadlocking: one study's events are applied one
            # transaction at a time across replicas. SQLite has one writer and ignores FOR UPDATE.
            rows = await s.scalars(
                select(Study)
                .where(Study.study_uid.in_(studies))
                .order_by(Study.study_uid)
                .with_for_update()
                .execution_options(populate_existing=True)
            )
            ws.studies = {st.study_uid: st for st in rows}
        images = await s.scalars(
            select(Image).where(or_(Image.study_uid.in_(studies), Image.sop_uid.in_(sops))).order_by(Image.sop_uid)
        )
        for image in images:
            ws.add_image(image)
        evidence_sops = sorted(set(ws.images) | set(sops))
        if evidence_sops:
            for pred in await s.scalars(select(PredictionRow).where(PredictionRow.sop_uid.in_(evidence_sops))):
                ws.add_prediction(pred)
            aggregates = select(LabelAggregateRow).where(LabelAggregateRow.sop_uid.in_(evidence_sops))
            for agg in await s.scalars(aggregates):
                ws.add_aggregate(agg)
        if evidence_sops or judgment_keys:
            judgments = await s.scalars(
                select(JudgmentRow).where(
                    or_(JudgmentRow.sop_uid.in_(evidence_sops), JudgmentRow.judgment_id.in_(judgment_keys))
                )
            )
            for j in judgments:
                ws.add_judgment(j)
        return ws

    async def _ensure_studies(self, s: AsyncSession, payloads: Sequence[Any]) -> None:
        """Create the studies the events name that do not exist yet, BEFORE anything is read.

        One ``INSERT ... ON CONFLICT DO NOTHING`` in UID order (like the row locks that `load` takes
        next): when two replicas see the same new study at once, the second INSERT waits for the
        first's commit and becomes a no-op, so neither fails on a primary key, and the loser then
        reads the winner's committed images and evidence under the study's lock.
        """
        arrived: dict[str, datetime] = {}
        lanes: dict[str, str] = {}
        for payload in payloads:
            uid = payload.image.study_instance_uid
            if lanes.get(uid) != FRESH:  # a study with any fresh image is fresh
                lanes[uid] = normalise_lane(payload.image.lane)
            when = received_at_of(payload) or utcnow()
            if uid not in arrived or when < arrived[uid]:
                arrived[uid] = when
        if not arrived:
            return
        now = utcnow()
        rows = [
            {
                "study_uid": uid,
                "flag": PENDING,
                "urgency": URGENCY[PENDING],
                "reason": "",
                "revision": 0,
                "model_version": "",
                "human_judgments": 0,
                "outside_intended_use": False,
                "arrived_at": arrived[uid],
                "updated_at": now,
                "lane": lanes[uid],
            }
            for uid in sorted(arrived)
        ]
        await s.execute(_insert_for(s)(Study).values(rows).on_conflict_do_nothing(index_elements=[Study.study_uid]))

    def _image(self, s: AsyncSession, ws: WorkingSet, ref: ImageRef) -> Image:
        image = ws.images.get(ref.sop_instance_uid)
        if image is None:
            image = new_image(ref)
            s.add(image)
            ws.add_image(image)
        image.series_uid = image.series_uid or ref.series_instance_uid
        image.storage_uri = image.storage_uri or ref.storage_uri
        image.sha256 = image.sha256 or ref.sha256
        return image

    # ---- events ----------------------------------------------------------------------------------
    async def apply(self, s: AsyncSession, payload: Any, trigger: str = "") -> Change | None:
        """Apply one event and recompute its study (the caller commits)."""
        return (await self.apply_batch(s, [(payload, trigger)]))[0]

    async def apply_batch(self, s: AsyncSession, events: Sequence[tuple[Any, str]]) -> list[Change | None]:
        """Apply events in order, each followed by its study's recomputation, in the caller's
        transaction (the caller commits). Reads everything the events touch first (a few queries),
        so the cost per event is mostly Python. Returns one Change (or None) per event."""
        if not events:
            return []
        payloads = [payload for payload, _ in events]
        await self._ensure_studies(s, payloads)
        ws = await self.load(
            s,
            {p.image.study_instance_uid for p in payloads},
            {p.image.sop_instance_uid for p in payloads},
            {p.judgment_id for p in payloads if isinstance(p, Judgment) and p.judgment_id},
        )
        return [self._apply_one(s, ws, payload, trigger) for payload, trigger in events]

    def _apply_one(self, s: AsyncSession, ws: WorkingSet, payload: Any, trigger: str) -> Change | None:
        ref: ImageRef = payload.image
        received_at = received_at_of(payload)
        study = ws.studies[ref.study_instance_uid]
        if received_at is not None and as_utc(study.arrived_at) > received_at:  # type: ignore[operator]
            study.arrived_at = received_at
        image = self._image(s, ws, ref)
        kind, applied = self._apply_event(s, ws, image, payload, received_at)
        EVENTS.labels(kind, "applied" if applied else "duplicate").inc()
        return self._recompute(s, ws, study, trigger=trigger, note=rescore_note(payload) if applied else "")

    def _apply_event(
        self, s: AsyncSession, ws: WorkingSet, image: Image, payload: Any, received_at: datetime | None
    ) -> tuple[str, bool]:
        if received_at is not None and (image.received_at is None or as_utc(image.received_at) > received_at):  # type: ignore[operator]
            image.received_at = received_at
        if isinstance(payload, ImageReceived):
            new = image.eligible is None
            if image.eligible is not False:  # a rejection is final
                image.eligible = bool(payload.triage_eligible)
            image.not_triaged_reason = payload.not_triaged_reason or ("" if payload.triage_eligible else "not eligible")
            image.outside_intended_use = payload.outside_intended_use
            image.intended_use_note = payload.intended_use_note
            image.view_position = payload.view_position
            image.patient_age_years = payload.patient_age_years
            return "image.received", new
        if isinstance(payload, ImageRejected):
            new = image.eligible is not False
            image.eligible = False
            image.not_triaged_reason = payload.reason or payload.reason_code or "rejected by ingest"
            return "image.rejected", new
        if isinstance(payload, Prediction):
            key = (payload.model_name, payload.model_version)
            exists = key in ws.predictions.get(image.sop_uid, {})
            if not exists:
                row = PredictionRow(
                    sop_uid=image.sop_uid,
                    model_name=payload.model_name,
                    model_version=payload.model_version,
                    probability=float(payload.probability),
                    logit=float(payload.logit),
                    runtime=payload.runtime,
                    heatmap_uri=payload.heatmap_uri,
                    predicted_at=from_timestamp(payload.predicted_at),
                    received_at=received_at,
                    stored_at=utcnow(),
                    gate_verdict=payload.gate_verdict,
                    gate_reason=payload.gate_reason,
                    gate_score=payload.gate_score if payload.gate_verdict else None,
                    superseded_by="",
                    superseded_reason="",
                )
                s.add(row)
                ws.add_prediction(row)
            superseded = self._supersede(ws, image.sop_uid, payload)
            return "prediction.made", not exists or superseded
        if isinstance(payload, Judgment):
            if not payload.judgment_id:
                raise PermanentError("judgment without judgment_id")
            exists = payload.judgment_id in ws.judgment_ids
            if not exists:
                row = JudgmentRow(
                    judgment_id=payload.judgment_id,
                    sop_uid=image.sop_uid,
                    annotator_id=payload.annotator_id,
                    answer=ANSWER_NAMES.get(payload.answer, "cant_tell"),
                    confidence=CONFIDENCE_NAMES.get(payload.confidence, ""),
                    trust=float(payload.annotator_trust),
                    is_gold=payload.is_gold,
                    has_click=payload.has_click,
                    click_x=payload.click_x,
                    click_y=payload.click_y,
                    submitted_at=from_timestamp(payload.submitted_at),
                )
                s.add(row)
                ws.add_judgment(row)
            return "judgment.submitted", not exists
        if isinstance(payload, LabelAggregate):
            exists = payload.revision in ws.aggregates.get(image.sop_uid, {})
            if not exists:
                row = LabelAggregateRow(
                    sop_uid=image.sop_uid,
                    revision=payload.revision,
                    p_pneumonia=float(payload.p_pneumonia),
                    judgments=payload.judgments,
                    complete=payload.complete,
                    method=payload.method,
                )
                s.add(row)
                ws.add_aggregate(row)
            return "label.aggregated", not exists
        raise TypeError(f"unexpected event {type(payload).__name__}")

    @staticmethod
    def _supersede(ws: WorkingSet, sop_uid: str, payload: Prediction) -> bool:
        """A re-score: the withdrawn version's prediction of this image stops counting (kept, marked
        with the version that replaced it and why). True when something was marked now."""
        withdrawn = payload.rescore_of_model_version
        if not withdrawn or withdrawn == payload.model_version:
            return False
        marked = False
        for (name, version), row in ws.predictions.get(sop_uid, {}).items():
            if name == payload.model_name and version == withdrawn and not row.superseded_by:
                row.superseded_by = payload.model_version
                row.superseded_reason = (payload.rescore_reason or f"model version {withdrawn} withdrawn")[:2000]
                marked = True
        return marked

    # ---- refusals --------------------------------------------------------------------------------
    async def record_refusals(self, s: AsyncSession, events: Sequence[ImageRejected]) -> list[Refusal]:
        """Record image.rejected events as refusals (idempotent per SOP instance and reason code);
        returns the new rows. Counted, visible to operators, never a dead letter."""
        if not events:
            return []
        keys = {(e.image.sop_instance_uid or "unknown", e.reason_code) for e in events}
        existing = await s.execute(
            select(Refusal.sop_uid, Refusal.reason_code).where(
                Refusal.sop_uid.in_(sorted({sop for sop, _ in keys})),
                Refusal.reason_code.in_(sorted({code for _, code in keys})),
            )
        )
        seen = {(sop, code) for sop, code in existing}
        new: list[Refusal] = []
        for e in events:
            key = (e.image.sop_instance_uid or "unknown", e.reason_code)
            if key in seen:
                continue
            seen.add(key)
            new.append(
                Refusal(
                    sop_uid=key[0],
                    reason_code=e.reason_code,
                    reason=e.reason[:2000],
                    dicom_status=int(e.dicom_status),
                    sop_class_uid=e.image.sop_class_uid,
                    study_uid=e.image.study_instance_uid,
                    calling_ae_title=e.calling_ae_title[:16],
                    received_at=received_at_of(e),
                    recorded_at=utcnow(),
                )
            )
        s.add_all(new)
        return new

    # ---- evidence --------------------------------------------------------------------------------
    async def current_prediction(self, s: AsyncSession, sop_uid: str) -> PredictionRow | None:
        return pick_prediction((await s.scalars(select(PredictionRow).where(PredictionRow.sop_uid == sop_uid))).all())

    def evidence(self, ws: WorkingSet, sop_uid: str) -> tuple[Evidence, PredictionRow | None]:
        pred = pick_prediction(ws.predictions.get(sop_uid, {}).values())
        judgments = sorted(ws.judgments.get(sop_uid, {}).values(), key=lambda j: j.judgment_id)
        agg = max(ws.aggregates.get(sop_uid, {}).values(), key=lambda a: a.revision, default=None)
        model_p = pred.probability if pred else None
        if pred is not None and self.site is not None and self.site.applies_to(pred.model_name, pred.model_version):
            model_p = self.site.probability(pred.logit)  # recalibrated on this site's confirmed labels
        ev = Evidence(
            model_probability=model_p,
            votes=tuple(Vote(j.answer, j.confidence or "sure", j.trust) for j in judgments),
            aggregate_p=agg.p_pneumonia if agg else None,
            model_version=pred.model_version if pred else "",
            gate=pred.gate_verdict if pred else "",
            gate_reason=pred.gate_reason if pred else "",
        )
        return ev, pred

    # ---- study result ----------------------------------------------------------------------------
    async def recompute(self, s: AsyncSession, study: Study, trigger: str = "") -> Change | None:
        """Recompute a study's result from the evidence in the database (the caller commits)."""
        ws = await self.load(s, {study.study_uid})
        return self._recompute(s, ws, ws.studies.get(study.study_uid, study), trigger)

    def _recompute(
        self, s: AsyncSession, ws: WorkingSet, study: Study, trigger: str = "", note: str = ""
    ) -> Change | None:
        images = ws.study_images.get(study.study_uid, [])
        results: list[ImageResult] = []
        evidence_log: dict[str, Any] = {}
        model_versions: set[str] = set()
        humans = 0
        for image in images:
            if image.eligible is False:
                image.flag, image.p_fused, image.reason = NOT_TRIAGED, None, image.not_triaged_reason
            else:
                ev, pred = self.evidence(ws, image.sop_uid)
                flag, p, reason = self.policy.classify(ev)
                if image.outside_intended_use and flag != PENDING:
                    reason += f"; outside intended use: {image.intended_use_note or 'see model card'}"
                image.flag, image.p_fused, image.reason = flag, p, reason
                humans += ev.human_votes
                if pred is not None:
                    model_versions.add(pred.model_version)
                evidence_log[image.sop_uid] = {
                    "model_probability": ev.model_probability,
                    "model_version": ev.model_version,
                    "votes": [[v.answer, v.confidence, round(v.trust, 3)] for v in ev.votes],
                    "aggregate_p": ev.aggregate_p,
                    "p_fused": None if p is None else round(p, 4),
                    "flag": flag,
                }
            results.append(ImageResult(image.flag, image.p_fused, image.reason))
        flag, p, reason = study_result(results)
        study.outside_intended_use = any(i.outside_intended_use for i in images)
        if study.overridden_by:
            flag, reason = study.flag, f"set by clinician review (policy says {flag}: {reason})"
        if note:  # why the evidence changed (a re-score): said in the audit trail
            reason = f"{reason}; {note}"
            evidence_log["rescore"] = note
        model_version = ",".join(sorted(model_versions))
        p_round = None if p is None else round(p, 3)
        old_p = None if study.p_pneumonia is None else round(study.p_pneumonia, 3)
        same = (
            flag == study.flag
            and p_round == old_p
            and model_version == study.model_version
            and humans == study.human_judgments
        )
        study.p_pneumonia, study.model_version, study.human_judgments = p, model_version, humans
        if same or flag == PENDING:
            study.reason = reason
            return None
        return self._new_revision(s, study, flag, reason, "policy", trigger, evidence_log, images)

    def _new_revision(
        self,
        s: AsyncSession,
        study: Study,
        flag: str,
        reason: str,
        source: str,
        trigger: str,
        evidence_log: dict[str, Any],
        images: Any,
    ) -> Change:
        previous = study.flag
        now = utcnow()
        study.revision += 1
        study.flag, study.urgency, study.reason, study.updated_at = flag, URGENCY[flag], reason, now
        change = Change(study.study_uid, flag, previous, study.revision, source)
        if study.first_flag_at is None:
            study.first_flag_at = now
            starts = [as_utc(i.received_at) for i in images if i.received_at is not None]
            if starts:
                change.first_flag_seconds = max(0.0, (now - min(starts)).total_seconds())  # type: ignore[type-var]
        s.add(
            TriageHistory(
                study_uid=study.study_uid,
                revision=study.revision,
                flag=flag,
                previous_flag=previous,
                p_pneumonia=study.p_pneumonia,
                reason=reason,
                source=source,
                trigger=trigger[:200],
                evidence=evidence_log,
                created_at=now,
            )
        )
        event = TriageUpdated(
            study_instance_uid=study.study_uid,
            flag=PROTO[flag],
            previous_flag=PROTO.get(previous, PROTO[PENDING]),
            p_pneumonia=study.p_pneumonia if study.p_pneumonia is not None else 0.0,
            reason=reason,
            revision=study.revision,
            model_version=study.model_version,
            human_judgments=study.human_judgments,
            sop_instance_uids=sorted(i.sop_uid for i in images),
        )
        event.updated_at.FromDatetime(now)
        add_event(
            s,
            Outbox,
            event,
            message_id=f"aggregator:{study.study_uid}:{study.revision}",
            correlation_id=trigger.split(":")[1] if trigger.count(":") >= 1 else study.study_uid,
        )
        # An SR revision for a new flag, or a clinician's confirm (the SR becomes VERIFIED). It is held
        # for the settle time (SR_AT_ONCE, i.e. URGENT: not at all); the sender freezes and sends it when due.
        sr_wanted = self.sr_enabled and (self.backfill_sr or study.lane != "backfill")
        if sr_wanted and (flag != previous or source == "clinician"):
            due = now if flag in SR_AT_ONCE else now + timedelta(seconds=self.sr_settle_s)
            s.add(
                SrDelivery(
                    study_uid=study.study_uid,
                    revision=study.revision,
                    flag=flag,
                    verified=bool(study.overridden_by),
                    created_at=now,
                    due_at=due,
                )
            )
            change.sr_queued = True
        return change

    # ---- clinician review ------------------------------------------------------------------------
    async def review(
        self, s: AsyncSession, study_uid: str, reviewer: str, action: str, flag: str | None = None, comment: str = ""
    ) -> Change:
        """Confirm the current flag, or overrule it with another; both are stored and become the flag."""
        study = await s.get(Study, study_uid, with_for_update=True)
        if study is None:
            raise KeyError(study_uid)
        if action == "confirm":
            new_flag = study.flag
        elif action == "overrule":
            if flag not in FLAGS or flag == study.flag:
                raise ValueError("overrule needs a different flag")
            new_flag = flag
        else:
            raise ValueError(f"unknown action {action!r}")
        if new_flag == PENDING:
            raise ValueError("nothing to confirm yet")
        s.add(
            Review(
                study_uid=study_uid,
                reviewer=reviewer,
                action=action,
                flag_before=study.flag,
                flag_after=new_flag,
                label=MEANS.get(new_flag, "cant_tell"),
                comment=comment[:2000],
            )
        )
        study.overridden_by = reviewer
        images = (await s.scalars(select(Image).where(Image.study_uid == study_uid))).all()
        verb = "confirmed" if action == "confirm" else f"overruled {study.flag} ->"
        reason = f"clinician {verb} {new_flag}" + (f": {comment[:200]}" if comment else "")
        change = self._new_revision(
            s, study, new_flag, reason, "clinician", f"review:{study_uid}", {"review": action}, images
        )
        OVERRIDES.labels(action).inc()
        return change
