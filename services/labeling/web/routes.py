"""The labeling web app: server-rendered pages for annotators and the job owner, and a small JSON API
(used by the simulated crowd and any scripted client). Every POST needs the session's CSRF token."""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Form, HTTPException, Request
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from sqlalchemy import func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.core.auth import SessionUser, WebSessions, csrf_token, require_csrf
from services.core.login_routes import login_router
from services.core.telemetry import HealthCheck, ops_router
from services.core.web_hardening import harden
from services.labeling.job import JobDefinition
from services.labeling.models import JudgmentRow, Task, User
from services.labeling.render import cached_png, path_from_uri
from services.labeling.stats import job_summary, skipped_by_check, skipped_images
from services.labeling.workflow import (
    NextItem,
    Submitted,
    WorkflowError,
    example_tasks,
    may_view_image,
    next_item,
    pending_judgments,
    quiz_answers,
    quiz_for_attempt,
    revealed_gold,
    submit,
    undo_last,
    visible_score,
)

HERE = Path(__file__).resolve().parent
OWNER_SKIPPED_LISTED = 50  # the latest images the input gate refused, on the owner page
templates = Jinja2Templates(directory=HERE / "templates")  # autoescape on for .html


async def answered_count(s: AsyncSession, user_id: int) -> int:
    """Work answers of an annotator that stand (not undone): their progress."""
    return int(
        await s.scalar(
            select(func.count()).where(
                JudgmentRow.user_id == user_id, JudgmentRow.context == "work", JudgmentRow.state != "undone"
            )
        )
        or 0
    )


@dataclass
class WebContext:
    sessions: async_sessionmaker[AsyncSession]
    job: JobDefinition
    render_dir: Path
    max_side: int
    lease_s: float
    on_final: Any = None  # callable: judgments were finalised (wake aggregation + outbox relay)
    rng: random.Random = field(default_factory=random.Random)


class AnswerIn(BaseModel):
    task_id: str = Field(max_length=64)
    answer: str = Field(max_length=20)
    confidence: str = Field(max_length=20)
    reason: str | None = Field(default=None, max_length=400)
    click_x: float | None = None
    click_y: float | None = None


class LoginIn(BaseModel):
    name: str = Field(max_length=100)
    password: str = Field(max_length=200)


def create_app(
    ctx: WebContext,
    web_sessions: WebSessions,
    health: HealthCheck | None = None,
    max_body_bytes: int = 1_048_576,
) -> FastAPI:
    app = FastAPI(title="PneumoTriage labeling", docs_url=None, redoc_url=None, openapi_url=None)
    web_sessions.install(app)
    harden(app, max_body_bytes)
    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    app.include_router(ops_router("labeling", health))
    annotator = web_sessions.require_role("annotator")
    owner = web_sessions.require_role("owner")
    router = APIRouter()

    @app.exception_handler(IntegrityError)
    async def conflict(request: Request, exc: IntegrityError) -> Response:
        # a concurrent request (double click, two tabs) got there first; nothing was written
        return await workflow_error(request, WorkflowError(409, "that was already done (concurrent request)"))

    @app.exception_handler(WorkflowError)
    async def workflow_error(request: Request, exc: WorkflowError) -> Response:
        if "text/html" in request.headers.get("accept", ""):
            return page(request, "error.html", {"message": exc.message}, status=exc.status)
        return JSONResponse({"detail": exc.message}, status_code=exc.status)

    def page(request: Request, name: str, extra: dict[str, Any], status: int = 200) -> HTMLResponse:
        from services.core.auth import current_user

        context = {"job": ctx.job, "csrf_token": csrf_token(request), "user": current_user(request), **extra}
        return templates.TemplateResponse(request, name, context, status_code=status)

    async def db_user(s: AsyncSession, who: SessionUser) -> User:
        user = await s.get(User, int(who.id))
        if user is None:
            raise HTTPException(401, "unknown user")
        return user

    # -- sign-in / sign-out (services/core/login_routes.py, shared with the worklist) ----------------
    app.include_router(
        login_router(web_sessions, page, home="/", name_field="name", wrong_message="Wrong name or password.")
    )

    @router.get("/")
    async def home(request: Request) -> Response:
        from services.core.auth import current_user

        who = current_user(request)
        if who is None:
            return RedirectResponse("/login", status_code=303)
        return RedirectResponse("/owner" if who.role in ("owner", "admin") else "/work", status_code=303)

    # -- annotator pages -------------------------------------------------------------------------
    @router.get("/instructions", response_class=HTMLResponse)
    async def instructions(request: Request, who: SessionUser = Depends(annotator)) -> HTMLResponse:
        async with ctx.sessions() as s:
            examples = await example_tasks(s)
        return page(request, "instructions.html", {"examples": examples})

    @router.post("/instructions", dependencies=[Depends(require_csrf)])
    async def instructions_read(request: Request, who: SessionUser = Depends(annotator)) -> Response:
        async with ctx.sessions() as s:
            (await db_user(s, who)).instructions_seen = True
            await s.commit()
        return RedirectResponse("/work", status_code=303)

    @router.get("/work", response_class=HTMLResponse)
    async def work(request: Request, fb: str | None = None, who: SessionUser = Depends(annotator)) -> Response:
        async with ctx.sessions() as s:
            user = await db_user(s, who)
            item = await next_item(s, user, ctx.job, ctx.lease_s, ctx.rng)
            await s.commit()
            if item.state == "instructions":
                return RedirectResponse("/instructions", status_code=303)
            feedback = await _feedback(s, user, fb)
            revealed, new = await revealed_gold(s, user, ctx.job, session_over=item.state in ("done", "stopped"))
            gold_answered, gold_right = visible_score(revealed)
            n_done = await answered_count(s, user.id)
            can_undo = bool(await pending_judgments(s, user.id))
            return page(
                request,
                "work.html",
                {
                    "item": item,
                    "feedback": feedback,
                    "gold_new": new,
                    "gold_answered": gold_answered,
                    "gold_right": gold_right,
                    "answered": n_done,
                    "can_undo": can_undo,
                    "status_reason": user.status_reason,
                    "status": user.status,
                    "quiz_attempt": user.quiz_attempt,
                },
            )

    async def _feedback(s: AsyncSession, user: User, judgment_id: str | None) -> dict[str, Any] | None:
        if not judgment_id:
            return None
        row = await s.get(JudgmentRow, judgment_id)
        # only quiz answers get feedback at once; hidden test questions are revealed later (revealed_gold)
        if row is None or row.user_id != user.id or row.context != "quiz":
            return None
        task = await s.get(Task, row.task_id)
        assert task is not None
        out: dict[str, Any] = {"correct": bool(row.correct), "gold_label": task.gold_label, "reason": task.gold_reason}
        if row.context == "quiz":
            results = await quiz_answers(s, user.id, row.quiz_attempt)
            if len(results) >= len(await quiz_for_attempt(s, user, ctx.job, row.quiz_attempt)):  # finished
                out["quiz"] = {
                    "attempt": row.quiz_attempt + 1,
                    "right": sum(1 for r in results if r),
                    "total": len(results),
                    "passed": user.quiz_passed and row.quiz_attempt == user.quiz_attempt,
                    "pass_mark": ctx.job.gold.quiz_pass_mark,
                    "attempts_left": max(0, ctx.job.gold.quiz_attempts - user.quiz_attempt),
                }
        return out

    @router.post("/answer", dependencies=[Depends(require_csrf)])
    async def answer_form(
        request: Request,
        task_id: str = Form(max_length=64),
        answer: str = Form(max_length=20),
        confidence: str = Form("sure", max_length=20),
        reason: str = Form("", max_length=400),
        click_x: str = Form(""),
        click_y: str = Form(""),
        who: SessionUser = Depends(annotator),
    ) -> Response:
        result = await _submit(who, AnswerIn(**_answer_fields(task_id, answer, confidence, reason, click_x, click_y)))
        target = "/work"
        if result.judgment.context == "quiz" and (result.correct is False or result.quiz_finished):
            target += f"?fb={result.judgment.id}"
        return RedirectResponse(target, status_code=303)

    def _answer_fields(task_id: str, answer: str, confidence: str, reason: str, cx: str, cy: str) -> dict[str, Any]:
        try:
            click = (float(cx), float(cy)) if cx and cy else None
        except ValueError as exc:
            raise WorkflowError(422, "click position must be numbers") from exc
        return {
            "task_id": task_id,
            "answer": answer,
            "confidence": confidence,
            "reason": reason or None,
            "click_x": click[0] if click else None,
            "click_y": click[1] if click else None,
        }

    async def _submit(who: SessionUser, body: AnswerIn) -> Submitted:
        click = (body.click_x, body.click_y) if body.click_x is not None and body.click_y is not None else None
        async with ctx.sessions() as s:
            user = await db_user(s, who)
            result = await submit(
                s,
                user,
                body.task_id,
                ctx.job,
                answer=body.answer,
                confidence=body.confidence,
                reason=body.reason,
                click=click,
            )
            await s.commit()
        if ctx.on_final is not None:
            ctx.on_final()
        return result

    @router.post("/undo", dependencies=[Depends(require_csrf)])
    async def undo_form(request: Request, who: SessionUser = Depends(annotator)) -> Response:
        async with ctx.sessions() as s:
            await undo_last(s, await db_user(s, who))
            await s.commit()
        return RedirectResponse("/work", status_code=303)

    @router.get("/img/{task_id}.png")
    async def image(task_id: str, request: Request) -> Response:
        from services.core.auth import current_user

        who = current_user(request)
        if who is None:
            raise HTTPException(401, "sign in first")
        async with ctx.sessions() as s:
            task = await s.get(Task, task_id[:64])
            user = await s.get(User, int(who.id))
            if task is None or user is None or not await may_view_image(s, user, who.role, task, ctx.job):
                raise HTTPException(404, "no such image")
        source = Path(task.source_path) if task.source_path else path_from_uri(task.storage_uri or "")
        png = await asyncio.to_thread(cached_png, ctx.render_dir, task.id, source, ctx.max_side)
        return FileResponse(png, media_type="image/png", headers={"Cache-Control": "private, max-age=3600"})

    # -- JSON API (annotators) -------------------------------------------------------------------
    @router.get("/api/csrf")
    async def api_csrf(request: Request) -> dict[str, str]:
        return {"csrf_token": csrf_token(request)}

    @router.post("/api/login", dependencies=[Depends(require_csrf)])
    async def api_login(request: Request, body: LoginIn) -> JSONResponse:
        user = await web_sessions.sign_in(request, body.name, body.password)  # LoginThrottled: 429
        if user is None:
            raise HTTPException(401, "wrong name or password")
        return JSONResponse({"role": user.role, "csrf_token": csrf_token(request)})

    @router.post("/api/instructions", dependencies=[Depends(require_csrf)])
    async def api_instructions(who: SessionUser = Depends(annotator)) -> dict[str, bool]:
        async with ctx.sessions() as s:
            (await db_user(s, who)).instructions_seen = True
            await s.commit()
        return {"ok": True}

    @router.get("/api/next")
    async def api_next(who: SessionUser = Depends(annotator)) -> dict[str, Any]:
        async with ctx.sessions() as s:
            user = await db_user(s, who)
            item: NextItem = await next_item(s, user, ctx.job, ctx.lease_s, ctx.rng)
            await s.commit()
        out: dict[str, Any] = {"state": item.state}
        if item.task is not None:
            out.update(task_id=item.task.id, image_url=f"/img/{item.task.id}.png")
        if item.state == "quiz":
            out.update(quiz_index=item.quiz_index, quiz_total=item.quiz_total)
        return out

    @router.post("/api/judgments", dependencies=[Depends(require_csrf)])
    async def api_judgment(body: AnswerIn, who: SessionUser = Depends(annotator)) -> dict[str, Any]:
        result = await _submit(who, body)
        out: dict[str, Any] = {"judgment_id": result.judgment.id, "stopped": result.stopped}
        if result.judgment.context != "quiz":
            # the same answer for a work image and a hidden test question: gold results come later,
            # batched, from /api/feedback (after gold.feedback_delay further answers)
            return out
        if result.correct is False:  # the reason is shown after a miss, never before
            out.update(correct=False, gold_label=result.task.gold_label, reason=result.task.gold_reason)
        elif result.correct:
            out["correct"] = True
        if result.quiz_finished:
            out.update(quiz_finished=True, quiz_passed=result.quiz_passed, quiz_score=result.quiz_score)
        return out

    @router.post("/api/undo", dependencies=[Depends(require_csrf)])
    async def api_undo(who: SessionUser = Depends(annotator)) -> dict[str, str]:
        async with ctx.sessions() as s:
            task = await undo_last(s, await db_user(s, who))
            await s.commit()
        return {"task_id": task.id}

    @router.get("/api/me")
    async def api_me(who: SessionUser = Depends(annotator)) -> dict[str, Any]:
        async with ctx.sessions() as s:
            user = await db_user(s, who)
            revealed, _new = await revealed_gold(s, user, ctx.job)
            n = await answered_count(s, user.id)
        answered, right = visible_score(revealed)
        return {
            "annotator_id": user.pseudonym,
            "status": user.status,
            "quiz_passed": user.quiz_passed,
            "judgments": n,
            "gold_answered": answered,  # revealed test questions only (see /api/feedback)
            "gold_accuracy": right / answered if answered else None,
        }

    def _gold_item(g: Any) -> dict[str, Any]:
        return {
            "task_id": g.task.id,
            "image_url": f"/img/{g.task.id}.png",
            "answer_number": g.position + 1,
            "your_answer": g.judgment.answer,
            "gold_label": g.task.gold_label,
            "correct": bool(g.judgment.correct),
            "reason": g.task.gold_reason,
        }

    @router.get("/api/feedback")
    async def api_feedback(who: SessionUser = Depends(annotator)) -> dict[str, Any]:
        """Results of the annotator's test questions, each revealed gold.feedback_delay answers later."""
        async with ctx.sessions() as s:
            user = await db_user(s, who)
            revealed, _new = await revealed_gold(s, user, ctx.job)
        answered, right = visible_score(revealed)
        return {
            "feedback_delay": ctx.job.gold.feedback_delay,
            "revealed": answered,
            "right": right,
            "items": [_gold_item(g) for g in revealed],
        }

    @router.get("/feedback", response_class=HTMLResponse)
    async def feedback_page(request: Request, who: SessionUser = Depends(annotator)) -> HTMLResponse:
        async with ctx.sessions() as s:
            user = await db_user(s, who)
            revealed, _new = await revealed_gold(s, user, ctx.job)
        answered, right = visible_score(revealed)
        return page(
            request,
            "feedback.html",
            {"items": [_gold_item(g) for g in revealed], "gold_answered": answered, "gold_right": right},
        )

    # -- owner -----------------------------------------------------------------------------------
    @router.get("/owner", response_class=HTMLResponse)
    async def owner_page(request: Request, who: SessionUser = Depends(owner)) -> HTMLResponse:
        async with ctx.sessions() as s:
            summary = await job_summary(s, ctx.job)
            skipped = await skipped_images(s, OWNER_SKIPPED_LISTED)
        return page(request, "owner.html", {"s": summary, "skipped": skipped})

    @router.get("/owner/annotators/{pseudonym}", response_class=HTMLResponse)
    async def owner_annotator(request: Request, pseudonym: str, who: SessionUser = Depends(owner)) -> HTMLResponse:
        async with ctx.sessions() as s:
            user = await s.scalar(select(User).where(User.pseudonym == pseudonym[:40]))
            if user is None:
                raise HTTPException(404, "no such annotator")
            rows = (
                await s.scalars(
                    select(JudgmentRow).where(JudgmentRow.user_id == user.id).order_by(JudgmentRow.submitted_at)
                )
            ).all()
        return page(request, "owner_annotator.html", {"annotator": user, "rows": rows})

    @router.get("/api/owner/summary")
    async def api_summary(who: SessionUser = Depends(owner)) -> dict[str, Any]:
        async with ctx.sessions() as s:
            return await job_summary(s, ctx.job)

    @router.get("/api/owner/skipped")
    async def api_skipped(who: SessionUser = Depends(owner), limit: int = 100) -> dict[str, Any]:
        """Images the input gate refused: no task was made of them (count per rule, the latest ones)."""
        async with ctx.sessions() as s:
            by_check = await skipped_by_check(s)
            images = await skipped_images(s, max(1, min(limit, 1000)))
        return {"total": sum(by_check.values()), "by_check": by_check, "images": images}

    @router.get("/api/owner/labels")
    async def api_labels(who: SessionUser = Depends(owner)) -> dict[str, Any]:
        async with ctx.sessions() as s:
            tasks = (await s.scalars(select(Task).where(Task.kind == "work").order_by(Task.created_at))).all()
            users = {u.id: u for u in (await s.scalars(select(User))).all()}
            rows = (
                await s.scalars(
                    select(JudgmentRow)
                    .where(JudgmentRow.context == "work", JudgmentRow.state != "undone")
                    .order_by(JudgmentRow.submitted_at)
                )
            ).all()
        by_task: dict[str, list[dict[str, Any]]] = {}
        for r in rows:
            by_task.setdefault(r.task_id, []).append(
                {
                    "annotator_id": users[r.user_id].pseudonym,
                    "annotator_status": users[r.user_id].status,
                    "answer": r.answer,
                    "state": r.state,
                }
            )
        return {
            "pending": sum(1 for r in rows if r.state == "pending"),
            "open": sum(1 for t in tasks if t.status == "open"),
            "tasks": [
                {
                    "task_id": t.id,
                    "final_label": t.final_label,
                    "p_pneumonia": t.p_pneumonia,
                    "complete": t.status == "complete",
                    "judgments": t.judgments,
                    "revision": t.revision,
                    "all_judgments": by_task.get(t.id, []),
                }
                for t in tasks
            ],
        }

    app.include_router(router)
    return app
