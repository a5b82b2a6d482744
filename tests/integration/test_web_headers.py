"""Browser security headers on every response of both web apps (issue 22, item 10): CSP,
X-Frame-Options, X-Content-Type-Options and Referrer-Policy, from the one middleware in
services/core/web_hardening.py.

Every route the app has is requested (enumerated from the app itself, so a new route is covered
without editing this test): signed in as admin, anonymous, and with a POST's CSRF token, plus the
static files, an unknown path and the worklist's event stream. Each request goes straight to the
ASGI app, which reads a closed connection after the request body, so streams end."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any

import httpx
from starlette.routing import Mount, Route

from services.aggregator.service import Aggregator
from services.aggregator.users import upsert_user
from services.aggregator.web.app import COOKIE, create_app
from services.core.auth import hash_password
from services.core.db import upgrade
from services.labeling.app import LabelingService, record_job
from services.labeling.config import LabelingSettings
from services.labeling.models import Base as LabelingBase
from services.labeling.models import User as LabelingUser
from tests.support.aggregator_service import apply_events, offline_aggregator_fixture, prediction, received  # noqa: F401

PASSWORD = "pw-123456"
EXPECTED = {
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}
CSP_DIRECTIVES = {
    "default-src": "'self'",
    "script-src": "'self'",
    "style-src": "'self'",
    "img-src": "'self'",
    "object-src": "'none'",
    "base-uri": "'none'",
    "frame-ancestors": "'none'",
    "form-action": "'self'",
}


async def response_start(app: Any, method: str, path: str, headers: dict[str, str], body: bytes = b"") -> dict:
    """Status and headers of one request sent to the ASGI app; the client hangs up after the body."""
    starts: list[dict] = []
    sent = False

    async def receive() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        if message["type"] == "http.response.start":
            starts.append(message)

    raw = [(k.lower().encode(), v.encode()) for k, v in {"host": "app", **headers}.items()]
    path_only, _, query = path.partition("?")
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path_only,
        "raw_path": path_only.encode(),
        "query_string": query.encode(),
        "headers": raw,
        "client": ("10.2.2.2", 50000),
        "server": ("app", 80),
        "root_path": "",
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=15)
    assert len(starts) == 1, (method, path, starts)
    return {"status": starts[0]["status"], "headers": {k.decode().lower(): v.decode() for k, v in starts[0]["headers"]}}


def assert_security_headers(res: dict, what: str) -> None:
    headers = res["headers"]
    for name, value in EXPECTED.items():
        assert headers.get(name) == value, f"{what} ({res['status']}): {name} = {headers.get(name)!r}"
    csp = headers.get("content-security-policy")
    assert csp, f"{what} ({res['status']}): no Content-Security-Policy"
    directives = dict(d.strip().split(" ", 1) for d in csp.split(";"))
    for name, value in CSP_DIRECTIVES.items():
        assert directives.get(name) == value, f"{what}: CSP {name} = {directives.get(name)!r}"
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp, csp


def requests_for(app: Any) -> list[tuple[str, str]]:
    """(method, path) of every route and mounted static file of the app, path parameters filled in."""
    out: list[tuple[str, str]] = []

    def walk(routes: list[Any], prefix: str) -> None:
        for route in routes:
            if isinstance(route, Route):
                path = prefix + re.sub(r"{[^}]+}", "1.2.3", route.path_format)
                out.extend((m, path) for m in sorted(route.methods or {"GET"}) if m != "HEAD")
            elif isinstance(route, Mount):
                directory = Path(route.app.directory)  # type: ignore[union-attr]
                out.extend(
                    ("GET", f"{prefix}{route.path}/{f.name}") for f in sorted(directory.iterdir()) if f.is_file()
                )
            else:  # a router included into the app (FastAPI keeps it whole, with the include's prefix)
                included = getattr(route, "original_router", None)
                assert included is not None, f"unknown route type {type(route)}: extend this test"
                walk(included.routes, prefix + getattr(getattr(route, "include_context", None), "prefix", ""))

    walk(app.routes, "")
    return out


async def check_every_route(app: Any, cookie_name: str, sign_in: Any) -> int:
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app") as client:
        csrf = await sign_in(client)
        cookie = f"{cookie_name}={client.cookies[cookie_name]}"
    checked = 0
    # sign-out last: it ends the admin's session (on the server) for every later request
    todo = sorted([*requests_for(app), ("GET", "/no-such-page")], key=lambda r: r == ("POST", "/logout"))
    for method, path in todo:
        for who, headers in (
            ("admin", {"cookie": cookie, "x-csrf-token": csrf, "accept": "text/html"}),
            ("admin api", {"cookie": cookie, "x-csrf-token": csrf, "content-type": "application/json"}),
            ("anonymous", {"accept": "text/html"}),
        ):
            body = b"{}" if method == "POST" and "content-type" in headers else b""
            res = await response_start(app, method, path, headers, body)
            assert_security_headers(res, f"{who} {method} {path}")
            checked += 1
    return checked


async def test_worklist_sends_security_headers_on_every_route(offline_aggregator: Aggregator) -> None:
    await upsert_user("root", "admin", PASSWORD, offline_aggregator.settings)
    # a study under the UID that fills every path parameter, so its pages answer 200
    await apply_events(offline_aggregator, received("1.2.3", "1.2.3"), prediction("1.2.3", 0.97, study="1.2.3"))
    app = create_app(offline_aggregator)

    async def sign_in(client: httpx.AsyncClient) -> str:
        token = re.search(r'name="csrf_token" value="([^"]+)"', (await client.get("/login")).text)
        assert token
        data = {"username": "root", "password": PASSWORD, "csrf_token": token.group(1), "next": "/worklist"}
        assert (await client.post("/login", data=data)).status_code == 303
        return str((await client.get("/api/v1/me")).json()["csrf_token"])

    routes = requests_for(app)
    assert ("GET", "/worklist/events") in routes and ("GET", "/static/worklist.js") in routes
    assert await check_every_route(app, COOKIE, sign_in) >= 3 * 20


async def test_labeling_sends_security_headers_on_every_route(tmp_path: Path) -> None:
    service = LabelingService(LabelingSettings(data_dir=tmp_path, secret_key="test-secret"))
    try:
        await upgrade(service.engine, "labeling", LabelingBase.metadata)
        await record_job(service.sessions, service.job)
        async with service.sessions() as s:
            s.add(LabelingUser(name="root", role="admin", password_hash=hash_password(PASSWORD)))
            await s.commit()
        app = service.web_app()

        async def sign_in(client: httpx.AsyncClient) -> str:
            token = (await client.get("/api/csrf")).json()["csrf_token"]
            res = await client.post(
                "/api/login", json={"name": "root", "password": PASSWORD}, headers={"X-CSRF-Token": token}
            )
            assert res.status_code == 200, res.text
            return str((await client.get("/api/csrf")).json()["csrf_token"])

        routes = requests_for(app)
        assert ("GET", "/work") in routes and ("GET", "/static/app.js") in routes
        assert await check_every_route(app, "pt_labeling", sign_in) >= 3 * 20
    finally:
        await service.engine.dispose()
