"""What an annotator does next, and what happens to an answer: quiz, leases, hidden gold, trust,
stopping, undo and finalisation (judgment.submitted through the outbox).

All functions take an open AsyncSession; the caller commits.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy import case, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from services.core.contracts import Answer, Confidence, ImageRef, Judgment
from services.core.db.outbox import add_event, utcnow
from services.labeling.job import ANSWERS, CONFIDENCES, JobDefinition
from services.labeling.models import JudgmentRow, Lease, Outbox, Task, User
from services.labeling.quality import beta_trust

ANSWER_PB = {
    "pneumonia": Answer.ANSWER_PNEUMONIA,
    "healthy": Answer.ANSWER_HEALTHY,
    "cant_tell": Answer.ANSWER_CANT_TELL,
}
CONFIDENCE_PB = {"sure": Confidence.CONFIDENCE_SURE, "probably": Confidence.CONFIDENCE_PROBABLY}
GOLD_KINDS = ("example", "quiz", "hidden")
MAX_REASON_CHARS = 200


class WorkflowError(Exception):
    """A request that cannot be honoured; status is the HTTP status to answer with."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass
class GoldScore:
    answered: int
    correct: int
    trust: float

    @property
    def accuracy(self) -> float | None:
        return self.correct / self.answered if self.answered else None


def aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


async def gold_score(s: AsyncSession, user_id: int, job: JobDefinition) -> GoldScore:
    """The annotator's hidden-gold record in work (not undone) and their Beta-smoothed trust."""
    row = (
        await s.execute(
            select(func.count(), func.coalesce(func.sum(case((JudgmentRow.correct.is_(True), 1), else_=0)), 0)).where(
                JudgmentRow.user_id == user_id,
                JudgmentRow.context == "work",
                JudgmentRow.is_gold.is_(True),
                JudgmentRow.state != "undone",
            )
        )
    ).one()
    answered, correct = int(row[0]), int(row[1])
    return GoldScore(answered, correct, beta_trust(correct, answered, job.trust.prior_correct, job.trust.prior_wrong))


@dataclass
class GoldFeedback:
    """A hidden test question's result, as the annotator may see it (only once revealed)."""

    judgment: JudgmentRow
    task: Task
    position: int  # 0-based index of the answer among the annotator's work answers


async def revealed_gold(
    s: AsyncSession, user: User, job: JobDefinition, session_over: bool = False
) -> tuple[list[GoldFeedback], list[GoldFeedback]]:
    """(every revealed test-question result, the ones revealed by the latest answer).

    A hidden test question's result is revealed only once the annotator has given
    `gold.feedback_delay` further answers, or when their session is over (stopped, turned away, or
    no images left): the response to an answer never tells a test question from a work image.
    """
    rows = list(
        (
            await s.scalars(
                select(JudgmentRow)
                .where(JudgmentRow.user_id == user.id, JudgmentRow.context == "work", JudgmentRow.state != "undone")
                .order_by(JudgmentRow.submitted_at, JudgmentRow.id)
            )
        ).all()
    )
    over = session_over or user.status != "active"
    delay = job.gold.feedback_delay
    revealed: list[GoldFeedback] = []
    new: list[GoldFeedback] = []
    for i, row in enumerate(rows):
        if not row.is_gold or row.state != "final":
            continue
        later = len(rows) - 1 - i
        if later >= delay or over:
            task = await s.get(Task, row.task_id)
            assert task is not None
            revealed.append(GoldFeedback(row, task, i))
            if later == delay and not over:
                new.append(revealed[-1])
    return revealed, new


def visible_score(revealed: list[GoldFeedback]) -> tuple[int, int]:
    """(test questions revealed, of them right): what the annotator is shown of their own accuracy."""
    return len(revealed), sum(1 for g in revealed if g.judgment.correct)


async def _judged_task_ids(s: AsyncSession, user_id: int, context: str, attempt: int | None = None) -> set[str]:
    q = select(JudgmentRow.task_id).where(
        JudgmentRow.user_id == user_id, JudgmentRow.context == context, JudgmentRow.state != "undone"
    )
    if attempt is not None:
        q = q.where(JudgmentRow.quiz_attempt == attempt)
    return set((await s.scalars(q)).all())


async def quiz_tasks(s: AsyncSession) -> list[Task]:
    """The whole quiz pool (one disjoint set of quiz_length items per allowed attempt)."""
    return list((await s.scalars(select(Task).where(Task.kind == "quiz").order_by(Task.created_at, Task.id))).all())


async def quiz_for_attempt(s: AsyncSession, user: User, job: JobDefinition, attempt: int | None = None) -> list[Task]:
    """The quiz items of one attempt, in the order they are asked: drawn from the pool items this
    annotator has not seen in an earlier attempt, balanced by class, in an order private to the
    annotator and the attempt. A retake therefore never replays an image whose answer was shown."""
    attempt = user.quiz_attempt if attempt is None else attempt
    pool = await quiz_tasks(s)
    earlier = set(
        (
            await s.scalars(
                select(JudgmentRow.task_id).where(
                    JudgmentRow.user_id == user.id,
                    JudgmentRow.context == "quiz",
                    JudgmentRow.quiz_attempt < attempt,
                )
            )
        ).all()
    )

    def key(t: Task) -> bytes:
        return hashlib.sha256(f"{user.pseudonym}:{attempt}:{t.id}".encode()).digest()

    fresh = sorted((t for t in pool if t.id not in earlier), key=key)
    n = job.gold.quiz_length
    per_class = {"healthy": (n + 1) // 2, "pneumonia": n // 2}
    chosen = [t for t in fresh if t.gold_label == "healthy"][: per_class["healthy"]]
    chosen += [t for t in fresh if t.gold_label == "pneumonia"][: per_class["pneumonia"]]
    if len(chosen) < n:  # an unbalanced pool: fill up with whatever is left
        chosen += [t for t in fresh if t not in chosen][: n - len(chosen)]
    return sorted(chosen, key=key)


async def quiz_answers(s: AsyncSession, user_id: int, attempt: int) -> list[bool]:
    """Whether each quiz answer of one attempt was right."""
    rows = await s.scalars(
        select(JudgmentRow.correct).where(
            JudgmentRow.user_id == user_id,
            JudgmentRow.context == "quiz",
            JudgmentRow.quiz_attempt == attempt,
        )
    )
    return [bool(r) for r in rows.all()]


async def example_tasks(s: AsyncSession) -> list[Task]:
    return list((await s.scalars(select(Task).where(Task.kind == "example").order_by(Task.gold_label, Task.id))).all())


@dataclass
class NextItem:
    state: str  # instructions | quiz | work | done | stopped
    task: Task | None = None
    quiz_index: int = 0
    quiz_total: int = 0


async def next_item(
    s: AsyncSession, user: User, job: JobDefinition, lease_s: float, rng: random.Random | None = None
) -> NextItem:
    if user.status != "active":
        return NextItem("stopped")
    if not user.instructions_seen:
        return NextItem("instructions")
    if not user.quiz_passed:
        quiz = await quiz_for_attempt(s, user, job)
        done = await _judged_task_ids(s, user.id, "quiz", user.quiz_attempt)
        todo = [t for t in quiz if t.id not in done]
        if todo:
            return NextItem("quiz", todo[0], quiz_index=len(done) + 1, quiz_total=len(quiz))
        # an empty quiz (no gold imported) cannot gate anyone
        user.quiz_passed = True
    now = utcnow()
    mine = await s.scalar(select(Lease).where(Lease.user_id == user.id).order_by(Lease.leased_at.desc()).limit(1))
    judged = await _judged_task_ids(s, user.id, "work")
    if mine is not None:
        task = await s.get(Task, mine.task_id)
        if task is not None and task.id not in judged and (task.status == "open" or task.kind == "hidden"):
            return NextItem("work", task)
        await s.delete(mine)
    rng = rng or random.Random()
    hidden = [
        t
        for t in (await s.scalars(select(Task).where(Task.kind == "hidden").order_by(Task.id))).all()
        if t.id not in judged
    ]
    task: Task | None = None
    if hidden and rng.random() < job.gold.hidden_ratio:
        task = rng.choice(hidden)
    if task is None:
        task = await _pick_work_task(s, user, judged, now - timedelta(seconds=lease_s))
    if task is None and hidden:
        task = rng.choice(hidden)
    if task is None:
        return NextItem("done")
    await s.execute(Lease.__table__.delete().where(Lease.user_id == user.id))
    s.add(Lease(task_id=task.id, user_id=user.id, leased_at=now))
    return NextItem("work", task)


async def _pick_work_task(s: AsyncSession, user: User, judged: set[str], lease_cutoff: datetime) -> Task | None:
    """An open image this annotator has not judged whose judgments + others' live leases are short of
    what it needs; images already in progress first (finish them), then oldest first."""
    valid = (
        select(JudgmentRow.task_id, func.count().label("n"))
        .join(User, User.id == JudgmentRow.user_id)
        .where(JudgmentRow.context == "work", JudgmentRow.state != "undone", User.status != "stopped")
        .group_by(JudgmentRow.task_id)
        .subquery()
    )
    leased = (
        select(Lease.task_id, func.count().label("n"))
        .where(Lease.user_id != user.id, Lease.leased_at >= lease_cutoff)
        .group_by(Lease.task_id)
        .subquery()
    )
    n_valid = func.coalesce(valid.c.n, 0)
    rows = (
        await s.execute(
            select(Task, n_valid)
            .outerjoin(valid, valid.c.task_id == Task.id)
            .outerjoin(leased, leased.c.task_id == Task.id)
            .where(Task.kind == "work", Task.status == "open", n_valid + func.coalesce(leased.c.n, 0) < Task.needed)
            .order_by(n_valid.desc(), Task.created_at, Task.id)
            .limit(len(judged) + 50)
        )
    ).all()
    for task, _n in rows:
        if task.id not in judged:
            return task
    return None


@dataclass
class Submitted:
    judgment: JudgmentRow
    task: Task
    correct: bool | None
    quiz_finished: bool = False
    quiz_passed: bool = False
    quiz_score: float | None = None
    stopped: bool = False


def validate_answer(
    job: JobDefinition, answer: str, confidence: str, reason: str | None, click: tuple[float, float] | None
) -> str | None:
    if answer not in ANSWERS:
        raise WorkflowError(422, f"answer must be one of {', '.join(ANSWERS)}")
    if confidence not in CONFIDENCES:
        raise WorkflowError(422, f"confidence must be one of {', '.join(CONFIDENCES)}")
    reason = (reason or "").strip() or None
    if answer == "cant_tell" and not reason:
        raise WorkflowError(422, "say why you can't tell")
    if reason is not None and len(reason) > MAX_REASON_CHARS:
        raise WorkflowError(422, f"reason longer than {MAX_REASON_CHARS} characters")
    if click is not None and not all(0.0 <= v <= 1.0 for v in click):
        raise WorkflowError(422, "click position must be fractions of the image (0..1)")
    return reason if answer == "cant_tell" else None


async def submit(
    s: AsyncSession,
    user: User,
    task_id: str,
    job: JobDefinition,
    *,
    answer: str,
    confidence: str,
    reason: str | None = None,
    click: tuple[float, float] | None = None,
) -> Submitted:
    reason = validate_answer(job, answer, confidence, reason, click)
    if user.status != "active":
        raise WorkflowError(403, "you are no longer on this job")
    task = await s.get(Task, task_id)
    if task is None:
        raise WorkflowError(404, "no such task")
    now = utcnow()
    if task.kind == "quiz":
        return await _submit_quiz(s, user, task, job, answer, confidence, reason, now)
    if task.kind not in ("work", "hidden"):
        raise WorkflowError(409, "this image is not a question")
    if not user.quiz_passed:
        raise WorkflowError(403, "pass the quiz first")
    if task.id in await _judged_task_ids(s, user.id, "work"):
        raise WorkflowError(409, "you already answered this image")
    lease = await s.scalar(select(Lease).where(Lease.user_id == user.id, Lease.task_id == task.id))
    if lease is None:
        raise WorkflowError(409, "this image was not given to you (or your time on it ran out)")
    if task.kind == "work" and task.status != "open":
        await s.delete(lease)
        raise WorkflowError(409, "this image needs no more answers")
    for pending in await pending_judgments(s, user.id):
        await finalize(s, pending)
    score = await gold_score(s, user.id, job)
    is_gold = task.kind == "hidden"
    correct = (answer == task.gold_label) if is_gold else None
    row = JudgmentRow(
        task_id=task.id,
        user_id=user.id,
        context="work",
        answer=answer,
        confidence=confidence,
        cant_tell_reason=reason,
        click_x=click[0] if click else None,
        click_y=click[1] if click else None,
        seconds_spent=max(0.0, (now - aware(lease.leased_at)).total_seconds()),
        is_gold=is_gold,
        correct=correct,
        trust_at_submit=score.trust,
        job_key=job.key,
        submitted_at=now,
    )
    s.add(row)
    await s.delete(lease)
    await s.flush()
    stopped = False
    if is_gold:
        score = await gold_score(s, user.id, job)
        if score.answered >= job.trust.min_gold and score.trust < job.trust.threshold:
            user.status = "stopped"
            user.status_reason = (
                f"trust {score.trust:.2f} below {job.trust.threshold:.2f} after {score.answered} test questions"
            )
            stopped = True
    return Submitted(row, task, correct, stopped=stopped)


async def _submit_quiz(
    s: AsyncSession,
    user: User,
    task: Task,
    job: JobDefinition,
    answer: str,
    confidence: str,
    reason: str | None,
    now: datetime,
) -> Submitted:
    if user.quiz_passed:
        raise WorkflowError(409, "you already passed the quiz")
    if task.id in await _judged_task_ids(s, user.id, "quiz", user.quiz_attempt):
        raise WorkflowError(409, "you already answered this quiz question")
    quiz = await quiz_for_attempt(s, user, job)
    if task not in quiz:
        raise WorkflowError(409, "this image is not in your quiz")
    correct = answer == task.gold_label
    row = JudgmentRow(
        task_id=task.id,
        user_id=user.id,
        context="quiz",
        quiz_attempt=user.quiz_attempt,
        answer=answer,
        confidence=confidence,
        cant_tell_reason=reason,
        is_gold=True,
        correct=correct,
        state="final",
        job_key=job.key,
        submitted_at=now,
        finalized_at=now,
    )
    s.add(row)
    await s.flush()
    result = Submitted(row, task, correct)
    answers = await quiz_answers(s, user.id, user.quiz_attempt)
    if len(answers) >= len(quiz):
        score = sum(1 for a in answers if a) / max(len(answers), 1)
        result.quiz_finished, result.quiz_score = True, score
        if score >= job.gold.quiz_pass_mark:
            user.quiz_passed = result.quiz_passed = True
        else:
            user.quiz_attempt += 1
            # retakes are capped, and a retake needs a full set of quiz items not seen before
            if user.quiz_attempt >= job.gold.quiz_attempts or len(await quiz_for_attempt(s, user, job)) < len(quiz):
                user.status = "quiz_failed"
                user.status_reason = f"quiz score {score:.0%} below {job.gold.quiz_pass_mark:.0%}"
                result.stopped = True
    return result


async def pending_judgments(s: AsyncSession, user_id: int | None = None) -> list[JudgmentRow]:
    q = select(JudgmentRow).where(JudgmentRow.state == "pending")
    if user_id is not None:
        q = q.where(JudgmentRow.user_id == user_id)
    return list((await s.scalars(q.order_by(JudgmentRow.submitted_at))).all())


async def undo_last(s: AsyncSession, user: User) -> Task:
    """Withdraw the annotator's last answer while it is still pending; the image is theirs again."""
    pending = await pending_judgments(s, user.id)
    if not pending:
        raise WorkflowError(409, "nothing to undo (answers become final after the next image or a short time)")
    row = pending[-1]
    row.state = "undone"
    task = await s.get(Task, row.task_id)
    assert task is not None
    if row.is_gold and user.status == "stopped" and (user.status_reason or "").startswith("trust"):
        user.status, user.status_reason = "active", None  # the miss that stopped them was withdrawn
    await s.execute(Lease.__table__.delete().where(Lease.user_id == user.id))
    s.add(Lease(task_id=task.id, user_id=user.id, leased_at=utcnow()))
    return task


async def finalize(s: AsyncSession, row: JudgmentRow) -> None:
    """Make a pending answer final and stage judgment.submitted (work images only) in the outbox."""
    if row.state != "pending":
        return
    # conditional update: of two concurrent finalisers (the annotator's next answer, the sweeper) one wins
    now = utcnow()
    won = await s.execute(
        update(JudgmentRow)
        .where(JudgmentRow.id == row.id, JudgmentRow.state == "pending")
        .values(state="final", finalized_at=now)
        .execution_options(synchronize_session=False)
    )
    if won.rowcount != 1:
        return
    s.expire(row, ["state", "finalized_at"])
    task = await s.get(Task, row.task_id)
    user = await s.get(User, row.user_id)
    assert task is not None and user is not None
    if task.kind != "work" or not task.sop_instance_uid:
        return
    submitted = Timestamp()
    submitted.FromDatetime(aware(row.submitted_at))
    event = Judgment(
        image=image_ref(task),
        judgment_id=row.id,
        task_id=task.id,
        annotator_id=user.pseudonym,
        answer=ANSWER_PB[row.answer],
        confidence=CONFIDENCE_PB[row.confidence],
        cant_tell_reason=row.cant_tell_reason or "",
        annotator_trust=row.trust_at_submit,
        is_gold=False,
        has_click=row.click_x is not None,
        click_x=row.click_x or 0.0,
        click_y=row.click_y or 0.0,
        seconds_spent=row.seconds_spent,
        submitted_at=submitted,
        job_version=row.job_key,
    )
    add_event(s, Outbox, event, message_id=f"labeling:{row.id}", correlation_id=task.sop_instance_uid)


async def finalize_due(s: AsyncSession, undo_window_s: float) -> int:
    cutoff = utcnow() - timedelta(seconds=undo_window_s)
    due = [r for r in await pending_judgments(s) if aware(r.submitted_at) <= cutoff]
    for row in due:
        await finalize(s, row)
    return len(due)


def image_ref(task: Task) -> ImageRef:
    return ImageRef(
        study_instance_uid=task.study_instance_uid or "",
        series_instance_uid=task.series_instance_uid or "",
        sop_instance_uid=task.sop_instance_uid or "",
        sop_class_uid=task.sop_class_uid or "",
        storage_uri=task.storage_uri or "",
        sha256=task.sha256 or "",
    )


async def may_view_image(s: AsyncSession, user: User, role: str, task: Task, job: JobDefinition) -> bool:
    """Owners see every image; an annotator only examples, the quiz items of their current attempt,
    their current image and ones they judged."""
    if role in ("owner", "admin") or task.kind == "example":
        return True
    if await s.scalar(select(JudgmentRow.id).where(JudgmentRow.user_id == user.id, JudgmentRow.task_id == task.id)):
        return True
    if task.kind == "quiz":
        return not user.quiz_passed and task in await quiz_for_attempt(s, user, job)
    return bool(await s.scalar(select(Lease.id).where(Lease.user_id == user.id, Lease.task_id == task.id)))
