"""Re-score a withdrawn model version's studies (`pneumotriage triage rescore`, issue 27).

The aggregator knows every prediction per model version. For each image whose *current* prediction
(the one its flag rests on) was made by the withdrawn version, a `rescore.requested` event goes to
inference, which predicts the stored image again with the version it serves now and publishes a
`Prediction` naming the withdrawn version (`rescore_of_model_version`) and the reason. The
aggregator then marks the withdrawn prediction superseded (kept, no longer counted), recomputes the
study and writes the reason into the audit trail (`aggregator_triage_history.reason` and
`evidence.rescore`). A study a clinician confirmed or overruled keeps the clinician's flag (the
policy's new opinion is recorded beside it); those studies are listed here for review, never
changed silently.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.aggregator.models import Image, PredictionRow, Study
from services.aggregator.triage_store import pick_prediction
from services.core.broker import Broker, Outgoing
from services.core.contracts import ImageRef, RescoreRequested

ROUTING_KEY = "rescore.requested"


@dataclass(frozen=True)
class Target:
    study_uid: str
    series_uid: str
    sop_uid: str
    storage_uri: str
    sha256: str
    received_at: object = None  # datetime | None


@dataclass
class RescorePlan:
    version: str
    targets: list[Target] = field(default_factory=list)
    studies: set[str] = field(default_factory=set)
    reviewed: list[tuple[str, str, str]] = field(default_factory=list)  # (study, its flag, by whom)
    unreadable: int = 0  # judged by the version, but no stored file to re-score (listed, not sent)


async def plan_rescore(session: AsyncSession, version: str, model_name: str = "") -> RescorePlan:
    """The images whose current prediction was made by `version` (optionally of `model_name`)."""
    plan = RescorePlan(version)
    judged = select(PredictionRow.sop_uid).where(
        PredictionRow.model_version == version, PredictionRow.superseded_by == ""
    )
    if model_name:
        judged = judged.where(PredictionRow.model_name == model_name)
    rows = (await session.scalars(select(PredictionRow).where(PredictionRow.sop_uid.in_(judged)))).all()
    by_sop: dict[str, list[PredictionRow]] = {}
    for row in rows:
        by_sop.setdefault(row.sop_uid, []).append(row)
    current = {
        sop
        for sop, preds in by_sop.items()
        if (p := pick_prediction(preds)) is not None
        and p.model_version == version
        and (not model_name or p.model_name == model_name)
    }
    if not current:
        return plan
    images = (
        await session.scalars(select(Image).where(Image.sop_uid.in_(sorted(current))).order_by(Image.sop_uid))
    ).all()
    for image in images:
        if image.eligible is False:  # refused by ingest meanwhile: not triaged, nothing to re-score
            continue
        if not image.storage_uri:
            plan.unreadable += 1
            continue
        plan.targets.append(
            Target(image.study_uid, image.series_uid, image.sop_uid, image.storage_uri, image.sha256, image.received_at)
        )
        plan.studies.add(image.study_uid)
    if plan.studies:
        studies = (
            await session.scalars(
                select(Study).where(Study.study_uid.in_(sorted(plan.studies)), Study.overridden_by.is_not(None))
            )
        ).all()
        plan.reviewed = sorted((st.study_uid, st.flag, st.overridden_by or "") for st in studies)
    return plan


def requests(plan: RescorePlan, reason: str, request_id: str | None = None) -> list[Outgoing]:
    """One rescore.requested per image of the plan (the same request id for the whole run)."""
    from services.aggregator.triage_store import as_utc

    request_id = request_id or uuid.uuid4().hex[:12]
    out: list[Outgoing] = []
    for t in plan.targets:
        msg = RescoreRequested(
            image=ImageRef(
                study_instance_uid=t.study_uid,
                series_instance_uid=t.series_uid,
                sop_instance_uid=t.sop_uid,
                storage_uri=t.storage_uri,
                sha256=t.sha256,
            ),
            withdrawn_model_version=plan.version,
            reason=reason,
            request_id=request_id,
        )
        msg.requested_at.GetCurrentTime()
        received = as_utc(t.received_at)  # type: ignore[arg-type]
        if received is not None:
            msg.received_at.FromDatetime(received)
        out.append(Outgoing(ROUTING_KEY, msg, f"rescore:{request_id}:{t.sop_uid}", t.sop_uid))
    return out


async def publish(amqp_url: str, exchange: str, quorum: bool, items: Sequence[Outgoing]) -> int:
    """Publish with broker confirms; returns how many were confirmed (raises when none could be)."""
    broker = Broker(amqp_url, exchange, quorum)
    await broker.connect()
    try:
        confirmed = 0
        for start in range(0, len(items), 200):
            errors = await broker.publish_many(items[start : start + 200])
            confirmed += sum(1 for e in errors if e is None)
        return confirmed
    finally:
        await broker.close()
