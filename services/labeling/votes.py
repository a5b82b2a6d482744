"""Aggregation of human labels over the whole job: Dawid-Skene EM (hidden gold clamped, stopped
annotators excluded) or trust-weighted majority vote while there is too little data; dynamic
judgments (each image's `needed`) and label.aggregated through the outbox on every change.

This is the labeling job's crowd posterior: whether an image's label is settled, how many more
judgments it needs, what the export gives training. The aggregator computes related crowd evidence of
its own (`services/aggregator/fusion.py`): it sums the individual judgment.submitted votes, each with
the annotator's trust at the time, as they arrive, so that one vote changes a triage flag at once and
the flag stays monotone in every vote, which a whole-job re-fit (this module) cannot promise. It uses
the label.aggregated posterior from here only for an image none of whose votes has reached it yet, never
on top of the votes (that would count them twice). No code is shared: services meet only through events."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.core.contracts import LabelAggregate
from services.core.db.outbox import add_event, utcnow
from services.labeling.job import ANSWERS, JobDefinition
from services.labeling.models import JudgmentRow, Outbox, Task, User
from services.labeling.quality import dawid_skene, judgments_needed, majority_vote
from services.labeling.workflow import ANSWER_PB, image_ref

log = logging.getLogger(__name__)
CLASSES = ("pneumonia", "healthy")  # true classes; responses add cant_tell
RESPONSE_INDEX = {a: i for i, a in enumerate(ANSWERS)}


@dataclass
class Votes:
    task_ids: list[str]
    items: np.ndarray
    workers: np.ndarray
    responses: np.ndarray
    worker_ids: list[int]
    known: dict[int, int]
    unsure: np.ndarray  # True where the answer was "probably" (not "sure")


async def load_votes(s: AsyncSession) -> tuple[Votes, list[Task]]:
    """Final work judgments of annotators who are not stopped, on work images and hidden gold."""
    tasks = list((await s.scalars(select(Task).where(Task.kind.in_(("work", "hidden"))).order_by(Task.id))).all())
    index = {t.id: i for i, t in enumerate(tasks)}
    rows = (
        await s.execute(
            select(JudgmentRow.task_id, JudgmentRow.user_id, JudgmentRow.answer, JudgmentRow.confidence)
            .join(User, User.id == JudgmentRow.user_id)
            .where(JudgmentRow.context == "work", JudgmentRow.state == "final", User.status != "stopped")
        )
    ).all()
    worker_ids = sorted({r.user_id for r in rows})
    widx = {w: i for i, w in enumerate(worker_ids)}
    rows = [r for r in rows if r.task_id in index]
    known = {index[t.id]: CLASSES.index(t.gold_label) for t in tasks if t.kind == "hidden" and t.gold_label in CLASSES}
    return (
        Votes(
            [t.id for t in tasks],
            np.array([index[r.task_id] for r in rows], dtype=int),
            np.array([widx[r.user_id] for r in rows], dtype=int),
            np.array([RESPONSE_INDEX[r.answer] for r in rows], dtype=int),
            worker_ids,
            known,
            np.array([r.confidence == "probably" for r in rows], dtype=bool),
        ),
        tasks,
    )


async def trust_weights(s: AsyncSession, job: JobDefinition, worker_ids: list[int]) -> np.ndarray:
    from services.labeling.workflow import gold_score

    return np.array([(await gold_score(s, w, job)).trust for w in worker_ids], dtype=float)


async def aggregate_job(s: AsyncSession, job: JobDefinition) -> int:
    """Recompute every image's aggregate; stage label.aggregated for those that changed. Returns that count."""
    votes, tasks = await load_votes(s)
    n = len(tasks)
    if n == 0:
        return 0
    if len(votes.items) >= job.redundancy.em_min_judgments and len(votes.worker_ids) >= 2:
        agg = dawid_skene(
            votes.items,
            votes.workers,
            votes.responses,
            n,
            len(votes.worker_ids),
            n_classes=2,
            n_responses=3,
            known=votes.known,
            smoothing=1.0,
            unsure=votes.unsure,
        )
        post, method = agg.posteriors, "dawid_skene"
    else:
        weights = await trust_weights(s, job, votes.worker_ids)
        per_vote = weights[votes.workers] if len(votes.workers) else np.zeros(0)
        post, method = majority_vote(votes.items, votes.responses, n, 2, per_vote), "majority"
    counts = np.bincount(votes.items, minlength=n)
    cant = np.bincount(votes.items[votes.responses == RESPONSE_INDEX["cant_tell"]], minlength=n)
    changed = 0
    red = job.redundancy
    for i, task in enumerate(tasks):
        if task.kind != "work":
            continue
        valid = int(counts[i])
        p = float(post[i, 0])
        conf = max(p, 1 - p)
        needed = judgments_needed(valid, conf, red.judgments_per_image, red.max_judgments, red.target_confidence)
        complete = valid > 0 and needed <= valid
        label = "cant_tell" if cant[i] * 2 > valid else ("pneumonia" if p >= 0.5 else "healthy")  # most said so
        new_state = (label, round(p, 3), "complete" if complete else "open", valid, method)
        old_state = (
            task.final_label,
            round(task.p_pneumonia, 3) if task.p_pneumonia is not None else None,
            task.status,
            task.judgments,
            task.method,
        )
        task.needed = needed
        if valid == 0 or new_state == old_state:
            task.status = "complete" if complete else "open"
            continue
        task.final_label, task.p_pneumonia, task.confidence, task.method = label, p, conf, method
        task.status = "complete" if complete else "open"
        task.completed_at = utcnow() if complete else None
        task.revision += 1
        task.judgments = valid
        changed += 1
        if task.sop_instance_uid:
            ts = Timestamp()
            ts.FromDatetime(utcnow())
            msg = LabelAggregate(
                image=image_ref(task),
                p_pneumonia=p,
                final_label=ANSWER_PB[label],
                confidence=conf,
                judgments=valid,
                complete=complete,
                method=method,
                revision=task.revision,
                updated_at=ts,
            )
            add_event(
                s,
                Outbox,
                msg,
                message_id=f"labeling:{task.sop_instance_uid}:agg:{task.revision}",
                correlation_id=task.sop_instance_uid,
            )
    return changed
