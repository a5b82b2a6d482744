"""Read side of the worklist: studies with their images, evidence and history, as plain dicts
for the templates and the JSON API. Patient name/id come from the stored DICOM header (clinicians
are the treating team); they are never logged and never put in events."""

from __future__ import annotations

import asyncio
import functools
from datetime import date, datetime, time, timedelta
from typing import Any

from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.aggregator.flags import FLAGS, LABELS, PENDING
from services.aggregator.models import Image, JudgmentRow, LabelAggregateRow, Refusal, Review, Study, TriageHistory
from services.aggregator.stored_images import path_of, read_header
from services.aggregator.triage_store import TriageStore, as_utc


def iso(value: datetime | None) -> str | None:
    v = as_utc(value)
    return v.isoformat(timespec="seconds") if v else None


@functools.lru_cache(maxsize=4096)
def _patient_cached(storage_uri: str, mtime: float) -> tuple[str, str]:
    header = read_header(storage_uri)
    if header is None:
        return "", ""
    name = str(getattr(header, "PatientName", "") or "").replace("^", " ").strip()
    return name, str(getattr(header, "PatientID", "") or "")


def patient_of(storage_uri: str) -> tuple[str, str]:
    path = path_of(storage_uri)
    if path is None or not path.is_file():
        return "", ""
    return _patient_cached(storage_uri, path.stat().st_mtime)


def filtered(
    stmt: Select[Any], flags: list[str] | None, date_from: date | None, date_to: date | None, lane: str = "fresh"
) -> Select[Any]:
    if lane in ("fresh", "backfill"):  # "all": both
        stmt = stmt.where(Study.lane == lane)
    if flags:
        stmt = stmt.where(Study.flag.in_([f for f in flags if f in (*FLAGS, PENDING)]))
    if date_from:
        stmt = stmt.where(Study.arrived_at >= datetime.combine(date_from, time.min))
    if date_to:
        stmt = stmt.where(Study.arrived_at < datetime.combine(date_to + timedelta(days=1), time.min))
    return stmt


async def list_studies(
    s: AsyncSession,
    flags: list[str] | None = None,
    date_from: date | None = None,
    date_to: date | None = None,
    page: int = 1,
    page_size: int = 50,
    lane: str = "fresh",
) -> tuple[list[dict[str, Any]], int]:
    """Studies sorted by urgency, then arrival (oldest first), with the filters applied; `lane`
    fresh (today's list, the default) | backfill | all."""
    count = select(func.count()).select_from(Study)
    total = int(await s.scalar(filtered(count, flags, date_from, date_to, lane)) or 0)
    stmt = filtered(select(Study), flags, date_from, date_to, lane)
    stmt = stmt.order_by(Study.urgency, Study.arrived_at, Study.study_uid)
    stmt = stmt.offset((page - 1) * page_size).limit(page_size)
    studies = (await s.scalars(stmt)).all()
    uids = [st.study_uid for st in studies]
    images: dict[str, list[Image]] = {}
    if uids:
        for im in (await s.scalars(select(Image).where(Image.study_uid.in_(uids)).order_by(Image.sop_uid))).all():
            images.setdefault(im.study_uid, []).append(im)
    out = []
    for st in studies:
        ims = images.get(st.study_uid, [])
        name, pid = ("", "")
        for im in ims:
            name, pid = await asyncio.to_thread(patient_of, im.storage_uri)
            if name or pid:
                break
        out.append(study_summary(st, len(ims), name, pid))
    return out, total


def study_summary(st: Study, n_images: int, name: str = "", pid: str = "") -> dict[str, Any]:
    return {
        "study_uid": st.study_uid,
        "lane": st.lane,
        "flag": st.flag,
        "flag_label": LABELS.get(st.flag, st.flag),
        "urgency": st.urgency,
        "p_pneumonia": None if st.p_pneumonia is None else round(st.p_pneumonia, 4),
        "reason": st.reason,
        "revision": st.revision,
        "model_version": st.model_version,
        "human_judgments": st.human_judgments,
        "outside_intended_use": st.outside_intended_use,
        "reviewed_by": st.overridden_by,
        "arrived_at": iso(st.arrived_at),
        "first_flag_at": iso(st.first_flag_at),
        "updated_at": iso(st.updated_at),
        "images": n_images,
        "patient_name": name,
        "patient_id": pid,
    }


def agreement(answers: list[str]) -> float | None:
    """Share of pneumonia/healthy votes that agree with the majority (None without votes)."""
    decided = [a for a in answers if a in ("pneumonia", "healthy")]
    if not decided:
        return None
    top = max(decided.count("pneumonia"), decided.count("healthy"))
    return round(top / len(decided), 3)


async def study_detail(s: AsyncSession, store: TriageStore, study_uid: str) -> dict[str, Any] | None:
    st = await s.get(Study, study_uid)
    if st is None:
        return None
    images = (await s.scalars(select(Image).where(Image.study_uid == study_uid).order_by(Image.sop_uid))).all()
    name, pid = "", ""
    image_out = []
    for im in images:
        if not (name or pid):
            name, pid = await asyncio.to_thread(patient_of, im.storage_uri)
        pred = await store.current_prediction(s, im.sop_uid)
        vote_query = select(JudgmentRow).where(JudgmentRow.sop_uid == im.sop_uid).order_by(JudgmentRow.submitted_at)
        votes = (await s.scalars(vote_query)).all()
        agg = await s.scalar(
            select(LabelAggregateRow)
            .where(LabelAggregateRow.sop_uid == im.sop_uid)
            .order_by(LabelAggregateRow.revision.desc())
            .limit(1)
        )
        answers = [v.answer for v in votes]
        crowd_majority = None
        if answers.count("pneumonia") != answers.count("healthy"):
            crowd_majority = "pneumonia" if answers.count("pneumonia") > answers.count("healthy") else "healthy"
        model_says = None if pred is None else ("pneumonia" if pred.probability >= 0.5 else "healthy")
        image_out.append(
            {
                "sop_uid": im.sop_uid,
                "series_uid": im.series_uid,
                "flag": im.flag,
                "flag_label": LABELS.get(im.flag, im.flag),
                "p_fused": None if im.p_fused is None else round(im.p_fused, 4),
                "reason": im.reason,
                "eligible": im.eligible,
                "view_position": im.view_position,
                "outside_intended_use": im.outside_intended_use,
                "intended_use_note": im.intended_use_note,
                "has_pixels": path_of(im.storage_uri) is not None and bool(im.storage_uri),
                "model": None
                if pred is None
                else {
                    "probability": round(pred.probability, 4),
                    "model_name": pred.model_name,
                    "model_version": pred.model_version,
                    "runtime": pred.runtime,
                    "has_heatmap": bool(pred.heatmap_uri),
                },
                "votes": [
                    {
                        "annotator": v.annotator_id,
                        "answer": v.answer,
                        "confidence": v.confidence,
                        "trust": round(v.trust, 3),
                        "click": [round(v.click_x, 3), round(v.click_y, 3)] if v.has_click else None,
                    }
                    for v in votes
                ],
                "crowd": {
                    "pneumonia": answers.count("pneumonia"),
                    "healthy": answers.count("healthy"),
                    "cant_tell": answers.count("cant_tell"),
                    "agreement": agreement(answers),
                    "majority": crowd_majority,
                    "agrees_with_model": None
                    if (crowd_majority is None or model_says is None)
                    else crowd_majority == model_says,
                    "aggregate_p": None if agg is None else round(agg.p_pneumonia, 4),
                },
            }
        )
    out = study_summary(st, len(images), name, pid)
    out["image_details"] = image_out
    out["history"] = await history(s, study_uid)
    return out


async def history(s: AsyncSession, study_uid: str) -> list[dict[str, Any]]:
    rows = (
        await s.scalars(
            select(TriageHistory).where(TriageHistory.study_uid == study_uid).order_by(TriageHistory.revision.desc())
        )
    ).all()
    return [
        {
            "revision": h.revision,
            "flag": h.flag,
            "previous_flag": h.previous_flag,
            "p_pneumonia": None if h.p_pneumonia is None else round(h.p_pneumonia, 4),
            "reason": h.reason,
            "source": h.source,
            "trigger": h.trigger,
            "evidence": h.evidence,
            "at": iso(h.created_at),
        }
        for h in rows
    ]


async def reviews(s: AsyncSession, page: int = 1, page_size: int = 100) -> tuple[list[dict[str, Any]], int]:
    """Clinician reviews as high-trust labels, one row per image of the reviewed study."""
    total = int(await s.scalar(select(func.count()).select_from(Review)) or 0)
    rows = (await s.scalars(select(Review).order_by(Review.id).offset((page - 1) * page_size).limit(page_size))).all()
    out = []
    for r in rows:
        sops = (await s.scalars(select(Image.sop_uid).where(Image.study_uid == r.study_uid))).all()
        out.append(
            {
                "review_id": r.id,
                "study_uid": r.study_uid,
                "sop_instance_uids": sorted(sops),
                "label": r.label,
                "action": r.action,
                "flag_before": r.flag_before,
                "flag_after": r.flag_after,
                "reviewer": r.reviewer,
                "trust": 0.99,
                "at": iso(r.created_at),
            }
        )
    return out, total


async def refusals(
    s: AsyncSession, page: int = 1, page_size: int = 100
) -> tuple[dict[str, int], list[dict[str, Any]], int]:
    """Images ingest refused (an expected outcome, not an error): counts by reason code, and the
    refusals newest first. UIDs and codes only, no patient data."""
    counts = await s.execute(select(Refusal.reason_code, func.count()).group_by(Refusal.reason_code))
    by_reason = {str(code): int(n) for code, n in counts}
    rows = (
        await s.scalars(select(Refusal).order_by(Refusal.id.desc()).offset((page - 1) * page_size).limit(page_size))
    ).all()
    items = [
        {
            "sop_instance_uid": r.sop_uid,
            "study_instance_uid": r.study_uid or None,
            "sop_class_uid": r.sop_class_uid,
            "reason_code": r.reason_code,
            "reason": r.reason,
            "dicom_status": f"0x{r.dicom_status:04X}",
            "calling_ae_title": r.calling_ae_title,
            "received_at": iso(r.received_at),
        }
        for r in rows
    ]
    return by_reason, items, sum(by_reason.values())


async def worklist_token(s: AsyncSession) -> str:
    """Changes whenever any study's result changes (for live updates)."""
    count, latest, revs = (
        await s.execute(select(func.count(), func.max(Study.updated_at), func.sum(Study.revision)).select_from(Study))
    ).one()
    return f"{count}:{latest}:{revs}"
