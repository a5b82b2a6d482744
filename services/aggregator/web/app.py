"""The clinician worklist (server-rendered, FastAPI + Jinja2, a little JS for live updates and
image controls), its JSON API (OpenAPI document at /api/openapi.json, paginated), FHIR output, /healthz and
/metrics. Only clinicians and admins get in (annotators get 403).

No `from __future__ import annotations` here: FastAPI must see the route signatures' real types
(the local `Clinician` dependency alias)."""

import asyncio
import functools
import json
import logging
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

from fastapi import Depends, FastAPI, Form, HTTPException, Query, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from pydantic import BaseModel, Field
from sqlalchemy import update

from services.aggregator.fhir import fhir_diagnostic_report
from services.aggregator.flags import FLAGS, LABELS, PENDING, css
from services.aggregator.models import PredictionRow, Study, User
from services.aggregator.ops import ops_report
from services.aggregator.report import DISCLAIMER
from services.aggregator.stored_images import heatmap_png, path_of
from services.aggregator.web import queries
from services.core.auth import (
    Account,
    SessionUser,
    WebSessions,
    csrf_token,
    current_user,
    require_csrf,
)
from services.core.login_routes import login_router
from services.core.telemetry import ops_router
from services.core.web_hardening import harden

if TYPE_CHECKING:
    from services.aggregator.service import Aggregator

log = logging.getLogger(__name__)
HERE = Path(__file__).resolve().parent
COOKIE = "pt_aggregator"
ALLOWED_ROLES = ("clinician", "admin")


MAX_PAGE = 100_000  # page * page_size stays far inside a 64-bit OFFSET
MAX_COMMENT = 4000
# Arrival-date filters outside these years are typing errors (and 9999-12-31 + 1 day overflows).
DATE_MIN, DATE_MAX = date(1900, 1, 1), date(2999, 12, 31)
DateParam = Annotated[
    date | None, Query(description=f"{DATE_MIN.isoformat()} to {DATE_MAX.isoformat()}", ge=DATE_MIN, le=DATE_MAX)
]


class ReviewIn(BaseModel):
    action: Literal["confirm", "overrule"]
    flag: str | None = Field(None, description="the new flag when overruling", max_length=40)
    comment: str = Field("", max_length=MAX_COMMENT)


class StudyFilter(BaseModel):
    """The worklist's filter: flags (empty = all) and an arrival-date range."""

    flags: list[str] | None = None
    date_from: date | None = None
    date_to: date | None = None
    lane: Literal["fresh", "backfill", "all"] = "fresh"


def study_filter(
    flag: Annotated[list[str] | None, Query(description=f"one or more of {', '.join(FLAGS)}, {PENDING}")] = None,
    date_from: DateParam = None,
    date_to: DateParam = None,
    lane: Annotated[
        Literal["fresh", "backfill", "all"],
        Query(description="fresh: today's studies (default); backfill: a catch-up or migration's; all"),
    ] = "fresh",
) -> StudyFilter:
    flags = [f for f in (flag or []) if f] or None
    return StudyFilter(flags=flags, date_from=date_from, date_to=date_to, lane=lane)


Filter = Annotated[StudyFilter, Depends(study_filter)]


class Page(BaseModel):
    items: list[dict[str, Any]]
    page: int
    page_size: int
    total: int


@functools.lru_cache(maxsize=64)  # ~64 rendered X-rays (<= 1024 px PNGs) in memory
def render_png(path: str, mtime: float, frame: int) -> bytes:
    from services.core.imaging import display_array, read_dicom, to_png

    return to_png(display_array(read_dicom(path), frame=frame), max_side=1024)


def create_app(agg: "Aggregator") -> FastAPI:
    settings = agg.settings
    app = FastAPI(
        title="PneumoTriage aggregator",
        description=f"Clinician worklist and results API. {DISCLAIMER}",
        version="1",
        docs_url=None,  # Swagger UI would load its JS/CSS from a public CDN: /api/openapi.json only
        openapi_url="/api/openapi.json",
        redoc_url=None,
    )

    async def load_account(username: str) -> Account | None:
        async with agg.sessions() as s:
            row = await s.get(User, username[:100])
        if row is None:
            return None
        return Account(row.username, row.role, row.username, row.password_hash, row.session_epoch)

    async def end_sessions(username: str) -> None:
        """Sign-out: raise the user's session epoch (atomic in the database every replica shares)."""
        async with agg.sessions() as s:
            stmt = update(User).where(User.username == username[:100])
            await s.execute(stmt.values(session_epoch=User.session_epoch + 1))
            await s.commit()

    web = WebSessions(
        settings.resolved_secret_key(),
        COOKIE,
        find_account=load_account,
        load_account=load_account,
        secure=settings.cookie_secure,
        max_age_s=settings.session_max_age_s,
        throttle=settings.login_throttle(),
        end_sessions=end_sessions,
    )
    web.install(app)
    harden(app, settings.http_max_body_bytes)
    app.include_router(ops_router("aggregator", agg.health))
    flag_css = css()

    @app.get("/flags.css", include_in_schema=False)
    async def flag_stylesheet() -> Response:
        """The flag badges' colours, generated from the registry (services/aggregator/flags.py)."""
        return Response(flag_css, media_type="text/css")

    app.mount("/static", StaticFiles(directory=HERE / "static"), name="static")
    templates = Jinja2Templates(directory=HERE / "templates")
    templates.env.globals["DISCLAIMER"] = DISCLAIMER
    templates.env.globals["FLAGS"] = FLAGS
    templates.env.globals["FLAG_LABELS"] = LABELS
    templates.env.globals["drift_status"] = lambda: agg.drift.status  # the worklist's drift banner
    clinician = web.require_role(*ALLOWED_ROLES)
    Clinician = Annotated[SessionUser, Depends(clinician)]
    Admin = Annotated[SessionUser, Depends(web.require_role("admin"))]

    async def sr_delivery_banner() -> list[dict[str, Any]]:
        """The destinations whose results are not reaching their PACS (services/aggregator/service.py
        `sr_health`): the oldest SR past PT_AGGREGATOR_SR_HEALTH_MAX_AGE_S (/healthz degraded) or the
        breaker open with SRs waiting; empty otherwise (or with no SR destination)."""
        if not agg.destinations:
            return []
        try:
            check = await agg.sr_health()
        except Exception:  # the banner must never take the worklist away
            log.warning("SR delivery check failed", exc_info=True)
            return []
        return [d for d in check["destinations"] if d["degraded"]]

    def page(
        request: Request,
        name: str,
        context: dict[str, Any],
        status: int = 200,
        headers: dict[str, str] | None = None,
    ) -> HTMLResponse:
        base = {"user": current_user(request), "csrf_token": csrf_token(request)}
        return templates.TemplateResponse(request, name, {**base, **context}, status_code=status, headers=headers)

    # ---- sign in / sign out (services/core/login_routes.py, shared with the labeling app) -------
    app.include_router(
        login_router(
            web,
            page,
            home="/worklist",
            name_field="username",
            wrong_message="Wrong user name or password.",
            next_max_length=2000,
        )
    )

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        return RedirectResponse("/worklist", status_code=303)

    # ---- worklist ----------------------------------------------------------------------------
    @app.get("/worklist", response_class=HTMLResponse, include_in_schema=False)
    async def worklist(
        request: Request,
        user: Clinician,
        filt: Filter,
    ) -> HTMLResponse:
        async with agg.sessions() as s:
            items, total = await queries.list_studies(
                s, filt.flags, filt.date_from, filt.date_to, 1, 500, lane=filt.lane
            )
            token = await queries.worklist_token(s)
        return page(
            request,
            "worklist.html",
            {
                "sr_delivery": await sr_delivery_banner(),
                "items": items,
                "total": total,
                "selected": filt.flags or [],
                "date_from": filt.date_from or "",
                "date_to": filt.date_to or "",
                "lane": filt.lane,
                "token": token,
                "query": request.url.query,
            },
        )

    @app.get("/worklist/rows", response_class=HTMLResponse, include_in_schema=False)
    async def worklist_rows(
        request: Request,
        user: Clinician,
        filt: Filter,
    ) -> HTMLResponse:
        async with agg.sessions() as s:
            items, total = await queries.list_studies(
                s, filt.flags, filt.date_from, filt.date_to, 1, 500, lane=filt.lane
            )
        return page(request, "_rows.html", {"items": items, "total": total})

    @app.get("/worklist/events", include_in_schema=False)
    async def worklist_events(request: Request, user: Clinician) -> StreamingResponse:
        """Server-sent events: one 'worklist' event each time any study's result changes."""

        async def stream() -> Any:
            last = None
            yield "retry: 3000\n\n"
            while not await request.is_disconnected():
                async with agg.sessions() as s:
                    token = await queries.worklist_token(s)
                if token != last:
                    if last is not None:
                        yield f"event: worklist\ndata: {json.dumps(token)}\n\n"
                    last = token
                else:
                    yield ": keep-alive\n\n"
                await asyncio.sleep(settings.sse_interval_seconds)

        return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-store"})

    @app.get("/studies/{study_uid}", response_class=HTMLResponse, include_in_schema=False)
    async def study_page(request: Request, study_uid: str, user: Clinician) -> HTMLResponse:
        async with agg.sessions() as s:
            detail = await queries.study_detail(s, agg.store, study_uid)
        if detail is None:
            raise HTTPException(404, "no such study")
        overrule_flags = [f for f in FLAGS if f != detail["flag"]]
        return page(request, "study.html", {"s": detail, "overrule_flags": overrule_flags})

    @app.post("/studies/{study_uid}/review", include_in_schema=False, dependencies=[Depends(require_csrf)])
    async def review_form(
        request: Request,
        study_uid: str,
        user: Clinician,
        action: Annotated[str, Form(max_length=20)],
        flag: Annotated[str | None, Form(max_length=40)] = None,
        comment: Annotated[str, Form(max_length=MAX_COMMENT)] = "",
    ) -> Response:
        await do_review(study_uid, user, ReviewIn(action=action, flag=flag or None, comment=comment))  # type: ignore[arg-type]
        return RedirectResponse(f"/studies/{study_uid}", status_code=303)

    async def do_review(study_uid: str, user: SessionUser, body: ReviewIn) -> dict[str, Any]:
        try:
            change = await agg.review(study_uid, user.name or user.id, body.action, body.flag, body.comment)
        except KeyError as exc:
            raise HTTPException(404, "no such study") from exc
        except ValueError as exc:
            raise HTTPException(422, str(exc)) from exc
        return {"study_uid": study_uid, "flag": change.flag, "revision": change.revision}

    # ---- images ------------------------------------------------------------------------------
    async def image_file(sop_uid: str) -> tuple[Any, Path]:
        from services.aggregator.models import Image

        async with agg.sessions() as s:
            im = await s.get(Image, sop_uid)
        path = path_of(im.storage_uri) if im is not None else None
        if im is None or path is None or not path.is_file():
            raise HTTPException(404, "image not stored here")
        return im, path

    @app.get("/images/{sop_uid}.png", include_in_schema=False)
    async def image_png(sop_uid: str, user: Clinician, frame: Annotated[int, Query(ge=0, le=10_000)] = 0) -> Response:
        _, path = await image_file(sop_uid)
        try:
            data = await asyncio.to_thread(render_png, str(path), path.stat().st_mtime, frame)
        except Exception as exc:
            raise HTTPException(422, "cannot render this image") from exc
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    @app.get("/images/{sop_uid}/heatmap.png", include_in_schema=False)
    async def image_heatmap(sop_uid: str, user: Clinician) -> Response:
        async with agg.sessions() as s:
            pred: PredictionRow | None = await agg.store.current_prediction(s, sop_uid)
        path = path_of(pred.heatmap_uri) if pred is not None and pred.heatmap_uri else None
        if path is None or not path.is_file():
            raise HTTPException(404, "no heatmap for this image")
        data = await asyncio.to_thread(heatmap_png, str(path), path.stat().st_mtime)
        return Response(data, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})

    # ---- JSON API ----------------------------------------------------------------------------
    @app.get("/api/v1/studies", response_model=Page, tags=["studies"])
    async def api_studies(
        user: Clinician,
        filt: Filter,
        page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
        page_size: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> Page:
        """Studies sorted by urgency, then arrival; filter by flag and arrival date."""
        async with agg.sessions() as s:
            items, total = await queries.list_studies(
                s, filt.flags, filt.date_from, filt.date_to, page, page_size, lane=filt.lane
            )
        return Page(items=items, page=page, page_size=page_size, total=total)

    @app.get("/api/v1/studies/{study_uid}", tags=["studies"])
    async def api_study(study_uid: str, user: Clinician) -> dict[str, Any]:
        """One study: flag, score, images with model score, crowd votes and agreement, flag history."""
        async with agg.sessions() as s:
            detail = await queries.study_detail(s, agg.store, study_uid)
        if detail is None:
            raise HTTPException(404, "no such study")
        return detail

    @app.get("/api/v1/studies/{study_uid}/history", tags=["studies"])
    async def api_history(study_uid: str, user: Clinician) -> list[dict[str, Any]]:
        """The audit trail: every change of the study's result, why, and on which evidence."""
        async with agg.sessions() as s:
            if await s.get(Study, study_uid) is None:
                raise HTTPException(404, "no such study")
            return await queries.history(s, study_uid)

    @app.post("/api/v1/studies/{study_uid}/review", tags=["studies"], dependencies=[Depends(require_csrf)])
    async def api_review(study_uid: str, body: ReviewIn, user: Clinician) -> dict[str, Any]:
        """Confirm the current flag or overrule it (send the session's CSRF token in X-CSRF-Token)."""
        return await do_review(study_uid, user, body)

    @app.get("/api/v1/studies/{study_uid}/fhir", tags=["fhir"])
    async def api_fhir(study_uid: str, user: Clinician) -> Response:
        """The study's result as a FHIR R4 DiagnosticReport (Patient and Observations contained)."""
        async with agg.sessions() as s:
            study = await s.get(Study, study_uid)
            if study is None:
                raise HTTPException(404, "no such study")
            report, header = await agg.study_report(s, study)
        body = json.dumps(fhir_diagnostic_report(report, header), ensure_ascii=False)
        return Response(body, media_type="application/fhir+json")

    @app.get("/api/v1/reviews", response_model=Page, tags=["reviews"])
    async def api_reviews(
        user: Clinician,
        page: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 1,
        page_size: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> Page:
        """Clinician confirms/overrules as high-trust labels (for the labeling and ML side)."""
        async with agg.sessions() as s:
            items, total = await queries.reviews(s, page, page_size)
        return Page(items=items, page=page, page_size=page_size, total=total)

    @app.get("/api/v1/drift", tags=["model"])
    async def api_drift(user: Clinician) -> dict[str, Any]:
        """The drift monitor: recent predictions against the model version's validation reference."""
        return agg.drift.status.to_dict()

    @app.get("/api/v1/ops", tags=["operations"])
    async def api_ops(user: Admin) -> dict[str, Any]:
        """The operations / ML page as JSON (admin): SR delivery per destination, lanes per stage,
        the models serving and in the repository (a site candidate's locked-set comparison, the
        promotions log), the site calibration in force and drift (services/aggregator/ops.py)."""
        return await ops_report(agg)

    @app.get("/ops", response_class=HTMLResponse, include_in_schema=False)
    async def ops_page(request: Request, user: Admin) -> HTMLResponse:
        return page(request, "ops.html", {"ops": await ops_report(agg)})

    @app.get("/api/v1/refusals", tags=["operations"])
    async def api_refusals(
        user: Clinician,
        page: Annotated[int, Query(ge=1, le=1_000_000)] = 1,
        page_size: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        """Images ingest refused (wrong SOP class, unreadable, too large ...): an expected outcome,
        counted by reason code, newest first. Also `pt_aggregator_refusals_total` on /metrics."""
        async with agg.sessions() as s:
            by_reason, items, total = await queries.refusals(s, page, page_size)
        return {"total": total, "by_reason": by_reason, "items": items, "page": page, "page_size": page_size}

    @app.get("/api/v1/me", tags=["session"])
    async def api_me(request: Request, user: Clinician) -> dict[str, str]:
        """Who is signed in, and the CSRF token to send with POSTs."""
        return {"user": user.name, "role": user.role, "csrf_token": csrf_token(request)}

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> Response:
        if exc.status_code == 403 and "text/html" in request.headers.get("accept", ""):
            return page(request, "forbidden.html", {"detail": exc.detail}, 403)
        return Response(
            json.dumps({"detail": exc.detail}),
            status_code=exc.status_code,
            media_type="application/json",
            headers=getattr(exc, "headers", None),
        )

    return app
