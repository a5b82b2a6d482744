"""The sign-in and sign-out pages of every web app (the clinician worklist and the labeling app), and
the one check that the `next` target after sign-in stays on this site.

Each app hands in its own page renderer (its templates, its `login.html`) and the few details in
which the two apps differ; the mechanics (throttle, constant-time password check, session, CSRF)
are `services.core.auth.WebSessions`':

    app.include_router(login_router(sessions, page, home="/worklist", name_field="username",
                                    wrong_message="Wrong user name or password.", next_max_length=2000))

GET  /login?next=...   the form (`next` made safe before it is put in the form)
POST /login            303 to a safe `next` (else `home`); 401 and the form again on a wrong name or
                       password, 429 with Retry-After while throttled (CSRF token required)
POST /logout           ends the user's sessions (every replica), 303 to /login (CSRF token required)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Form, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse

from services.core.auth import LoginThrottled, WebSessions, require_csrf

# render(request, template name, context, status code): the app's own page, with its base context
# (user, CSRF token, ...) added.
PageRenderer = Callable[[Request, str, dict[str, Any], int], Response]


def safe_next(target: str, fallback: str = "/") -> str:
    """`target` when it is a path on this site, else `fallback`: no open redirect after sign-in.

    Refused: anything not starting with "/" (absolute URLs such as `https://host`, `javascript:`,
    relative paths, the empty string), scheme-relative `//host`, any backslash (browsers read
    `/\\host` as `//host`) and control characters (browsers drop tabs and newlines, so `/\\t/host`
    would become `//host`)."""
    if not target.startswith("/") or target.startswith("//") or "\\" in target:
        return fallback
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in target):
        return fallback
    return target


def login_router(
    sessions: WebSessions,
    render: PageRenderer,
    *,
    home: str,
    name_field: str,
    wrong_message: str,
    next_max_length: int | None = None,
    template: str = "login.html",
) -> APIRouter:
    """GET/POST /login and POST /logout for one app.

    home: where a sign-in goes without (or with an unsafe) `next`; name_field: the form field
    holding the user name; wrong_message: shown (401) after a wrong name or password;
    next_max_length: longest `next` form value accepted (422 above it; None = no limit)."""
    router = APIRouter()

    def form(request: Request, next: str, status: int = 200, **context: Any) -> Response:
        return render(request, template, {"next": safe_next(next, home), "error": None, **context}, status)

    @router.get("/login", response_class=HTMLResponse, include_in_schema=False)
    async def login_page(request: Request, next: str = home) -> Response:
        return form(request, next)

    @router.post("/login", include_in_schema=False, dependencies=[Depends(require_csrf)])
    async def login(
        request: Request,
        name: str = Form(max_length=100, alias=name_field),
        password: str = Form(max_length=200),
        next: str = Form(home, max_length=next_max_length),
    ) -> Response:
        try:
            account = await sessions.sign_in(request, name, password)
        except LoginThrottled as exc:
            response = form(request, next, 429, name=name, error=exc.detail)
            response.headers.update(exc.headers or {})
            return response
        if account is None:
            return form(request, next, 401, name=name, error=wrong_message)
        return RedirectResponse(safe_next(next, home), status_code=303)

    @router.post("/logout", include_in_schema=False, dependencies=[Depends(require_csrf)])
    async def logout(request: Request) -> Response:
        await sessions.sign_out(request)
        return RedirectResponse("/login", status_code=303)

    return router
