"""Job-owner figures: progress, agreement, annotator table, contested gold, cost, images the input gate
kept out of the job."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from services.labeling.job import ANSWERS, JobDefinition
from services.labeling.models import JudgmentRow, SkippedImage, Task, User
from services.labeling.quality import fleiss_kappa, krippendorff_alpha_nominal
from services.labeling.workflow import gold_score


@dataclass
class AnnotatorRow:
    pseudonym: str
    name: str
    status: str
    status_reason: str | None
    quiz_attempts: int
    quiz_passed: bool
    judgments: int
    gold_answered: int
    gold_correct: int
    gold_accuracy: float | None
    trust: float
    median_seconds: float | None


async def annotator_table(s: AsyncSession, job: JobDefinition) -> list[AnnotatorRow]:
    users = (await s.scalars(select(User).where(User.role == "annotator").order_by(User.id))).all()
    out = []
    for u in users:
        rows = (
            await s.scalars(
                select(JudgmentRow).where(
                    JudgmentRow.user_id == u.id, JudgmentRow.context == "work", JudgmentRow.state != "undone"
                )
            )
        ).all()
        g = await gold_score(s, u.id, job)
        secs = [r.seconds_spent for r in rows]
        out.append(
            AnnotatorRow(
                u.pseudonym,
                u.name,
                u.status,
                u.status_reason,
                u.quiz_attempt + (1 if u.quiz_passed else 0),
                u.quiz_passed,
                len(rows),
                g.answered,
                g.correct,
                g.accuracy,
                g.trust,
                statistics.median(secs) if secs else None,
            )
        )
    return out


async def contested_gold(s: AsyncSession, job: JobDefinition, table: list[AnnotatorRow]) -> list[dict[str, Any]]:
    """Gold items whose label many trusted annotators dispute: check the label, fix or retire the item."""
    trusted_names = {a.pseudonym for a in table if a.status == "active" and a.trust >= job.trust.threshold}
    trusted = {u.id for u in (await s.scalars(select(User))).all() if u.pseudonym in trusted_names}
    gold = (await s.scalars(select(Task).where(Task.kind.in_(("quiz", "hidden"))))).all()
    rows = (
        await s.execute(
            select(JudgmentRow.task_id, JudgmentRow.user_id, JudgmentRow.answer).where(
                JudgmentRow.is_gold.is_(True), JudgmentRow.state != "undone"
            )
        )
    ).all()
    answers: dict[str, dict[int, str]] = defaultdict(dict)
    for r in rows:
        if r.user_id in trusted:
            answers[r.task_id][r.user_id] = r.answer  # the latest answer per annotator
    out = []
    for t in gold:
        given = list(answers.get(t.id, {}).values())
        if len(given) < job.gold.contested_min_trusted:
            continue
        disagree = sum(1 for a in given if a != t.gold_label)
        share = disagree / len(given)
        if share >= job.gold.contested_share:
            out.append(
                {"task_id": t.id, "kind": t.kind, "gold_label": t.gold_label, "answers": len(given), "disagree": share}
            )
    return out


async def skipped_by_check(s: AsyncSession) -> dict[str, int]:
    """Images the input gate refused (no task), per rule, most frequent first."""
    rows = (await s.execute(select(SkippedImage.gate_check, func.count()).group_by(SkippedImage.gate_check))).all()
    return {check: int(n) for check, n in sorted(rows, key=lambda r: (-r[1], r[0]))}


async def skipped_images(s: AsyncSession, limit: int = 100) -> list[dict[str, Any]]:
    """The latest images the input gate refused, with the reason (owner page and API only: never in
    an export or the job report, which count them)."""
    rows = (
        await s.scalars(
            select(SkippedImage).order_by(SkippedImage.skipped_at.desc(), SkippedImage.id.desc()).limit(limit)
        )
    ).all()
    return [
        {
            "skipped_at": r.skipped_at.isoformat(),
            "check": r.gate_check,
            "reason": r.reason,
            "gate_score": None if r.gate_score is None else round(r.gate_score, 4),
            "gate_version": r.gate_version,
            "sop_instance_uid": r.sop_instance_uid,
        }
        for r in rows
    ]


async def job_summary(s: AsyncSession, job: JobDefinition) -> dict[str, Any]:
    """Figures over work tasks only: an image the input gate refused never became one, so it is in no
    count, agreement or cost figure; it is counted apart (skipped_by_gate)."""
    tasks = (await s.scalars(select(Task).where(Task.kind == "work"))).all()
    complete = [t for t in tasks if t.status == "complete"]
    rows = (
        await s.execute(
            select(JudgmentRow.task_id, JudgmentRow.answer, JudgmentRow.state, JudgmentRow.is_gold).where(
                JudgmentRow.context == "work", JudgmentRow.state != "undone"
            )
        )
    ).all()
    work_ids = {t.id: i for i, t in enumerate(tasks)}
    counts = np.zeros((len(tasks), len(ANSWERS)))
    for r in rows:
        if r.task_id in work_ids and r.state == "final":
            counts[work_ids[r.task_id], ANSWERS.index(r.answer)] += 1
    paid = len(rows)
    cost = paid * job.pay.per_judgment
    work_judgments = sum(1 for r in rows if not r.is_gold)
    table = await annotator_table(s, job)
    label_counts: dict[str, int] = defaultdict(int)
    for t in complete:
        label_counts[t.final_label or "?"] += 1
    kappa = fleiss_kappa(counts)
    alpha = krippendorff_alpha_nominal(counts)
    skipped = await skipped_by_check(s)
    return {
        "job": job.key,
        "images": len(tasks),
        "complete": len(complete),
        "open": len(tasks) - len(complete),
        "borderline_images": sum(1 for t in tasks if t.gate_verdict == "borderline"),
        "skipped_by_gate": sum(skipped.values()),
        "skipped_by_check": skipped,
        "final_labels": dict(label_counts),
        "judgments_paid": paid,
        "judgments_on_images": work_judgments,
        "gold_judgments": paid - work_judgments,
        "mean_judgments_per_complete_image": (float(np.mean([t.judgments for t in complete])) if complete else None),
        "fleiss_kappa": None if np.isnan(kappa) else kappa,
        "krippendorff_alpha": None if np.isnan(alpha) else alpha,
        "currency": job.pay.currency,
        "cost_so_far": round(cost, 2),
        "cost_per_final_label": round(cost / len(complete), 4) if complete else None,
        "annotators": [asdict(a) for a in table],
        "contested_gold": await contested_gold(s, job, table),
    }
