"""services.core.auth: password hashes, signed sessions, roles and CSRF on a real FastAPI app."""

from __future__ import annotations

import re

import pytest
from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.testclient import TestClient

from services.core.auth import (
    SessionUser,
    WebSessions,
    csrf_token,
    hash_password,
    require_csrf,
    verify_password,
)

USERS = {"ann": ("annotator", hash_password("ann-pass")), "own": ("owner", hash_password("own-pass"))}
DISABLED: set[str] = set()


def make_app(secret: str = "test-secret", max_age_s: int = 3600) -> FastAPI:
    app = FastAPI()

    async def still_enabled(_request: Request, user: SessionUser) -> bool:
        return user.name not in DISABLED

    sessions = WebSessions(secret, "pt_test", max_age_s=max_age_s, user_check=still_enabled)
    sessions.install(app)

    @app.get("/login")
    async def login_form(request: Request) -> HTMLResponse:
        return HTMLResponse(f'<form><input name="csrf_token" value="{csrf_token(request)}"></form>')

    @app.post("/login", dependencies=[Depends(require_csrf)])
    async def login(request: Request, name: str = Form(), password: str = Form()) -> PlainTextResponse:
        role, stored = USERS.get(name, ("", "scrypt$1$1$1$AA==$AA=="))
        if not verify_password(password, stored):
            return PlainTextResponse("no", status_code=401)
        sessions.login(request, user_id=name, role=role, name=name)
        return PlainTextResponse("ok")

    @app.get("/work")
    async def work(user: SessionUser = Depends(sessions.require_role("annotator"))) -> PlainTextResponse:
        return PlainTextResponse(f"work for {user.name}")

    @app.get("/owner")
    async def owner(user: SessionUser = Depends(sessions.require_role("owner"))) -> PlainTextResponse:
        return PlainTextResponse("owner page")

    @app.post("/logout", dependencies=[Depends(require_csrf)])
    async def logout(request: Request) -> PlainTextResponse:
        sessions.logout(request)
        return PlainTextResponse("bye")

    return app


def token_from(client: TestClient) -> str:
    page = client.get("/login").text
    m = re.search(r'value="([^"]+)"', page)
    assert m
    return m.group(1)


def sign_in(client: TestClient, name: str, password: str) -> int:
    token = token_from(client)
    return client.post("/login", data={"name": name, "password": password, "csrf_token": token}).status_code


def test_password_hash_roundtrip_and_salt() -> None:
    a, b = hash_password("secret"), hash_password("secret")
    assert a != b  # salted
    assert verify_password("secret", a) and verify_password("secret", b)
    assert not verify_password("Secret", a)
    assert not verify_password("secret", "garbage")
    assert not verify_password("secret", "scrypt$x$8$1$AA==$AA==")
    with pytest.raises(ValueError):
        hash_password("")


def test_sign_in_and_roles() -> None:
    client = TestClient(make_app())
    assert client.get("/work").status_code == 401
    assert sign_in(client, "ann", "wrong") == 401
    assert sign_in(client, "ann", "ann-pass") == 200
    assert client.get("/work").text == "work for ann"
    assert client.get("/owner").status_code == 403
    owner = TestClient(make_app())
    assert sign_in(owner, "own", "own-pass") == 200
    assert owner.get("/owner").status_code == 200
    assert owner.get("/work").status_code == 403


def test_html_request_is_redirected_to_sign_in() -> None:
    client = TestClient(make_app(), follow_redirects=False)
    res = client.get("/work?x=1", headers={"accept": "text/html"})
    assert res.status_code == 303
    assert res.headers["location"].startswith("/login?next=/work%3Fx%3D1")


def test_cookie_flags_and_tampering() -> None:
    client = TestClient(make_app())
    assert sign_in(client, "ann", "ann-pass") == 200
    res = client.get("/login")  # an unchanged session is not re-sent
    assert "set-cookie" not in res.headers
    cookie = client.cookies["pt_test"]
    # forged cookie: same payload signed with another key is ignored
    other = TestClient(make_app(secret="other"))
    other.cookies.set("pt_test", cookie)
    assert other.get("/work").status_code == 401
    tampered = TestClient(make_app())
    tampered.cookies.set("pt_test", cookie[:-2] + ("AA" if cookie[-2:] != "AA" else "BB"))
    assert tampered.get("/work").status_code == 401


def test_set_cookie_is_httponly_lax() -> None:
    client = TestClient(make_app())
    token = token_from(client)
    res = client.post("/login", data={"name": "ann", "password": "ann-pass", "csrf_token": token})
    header = res.headers["set-cookie"].lower()  # sign-in rotates the session, so the cookie is re-sent
    assert "httponly" in header and "samesite=lax" in header


def test_csrf_required_and_rotated_at_login() -> None:
    client = TestClient(make_app())
    before = token_from(client)
    assert client.post("/login", data={"name": "ann", "password": "ann-pass"}).status_code == 403
    assert client.post("/login", data={"name": "ann", "password": "ann-pass", "csrf_token": "x"}).status_code == 403
    assert client.post("/login", data={"name": "ann", "password": "ann-pass", "csrf_token": before}).status_code == 200
    after = token_from(client)
    assert after != before
    assert client.post("/logout", data={"csrf_token": before}).status_code == 403
    assert client.post("/logout", headers={"X-CSRF-Token": after}).status_code == 200
    assert client.get("/work").status_code == 401


def test_token_of_another_session_is_refused() -> None:
    victim, attacker = TestClient(make_app()), TestClient(make_app())
    assert sign_in(victim, "ann", "ann-pass") == 200
    stolen_form_token = token_from(attacker)
    assert victim.post("/logout", data={"csrf_token": stolen_form_token}).status_code == 403


def test_user_check_ends_session_of_disabled_user() -> None:
    client = TestClient(make_app())
    assert sign_in(client, "ann", "ann-pass") == 200
    DISABLED.add("ann")
    try:
        assert client.get("/work").status_code == 401
    finally:
        DISABLED.discard("ann")
    assert client.get("/work").status_code == 401  # the session was ended, not just refused once


def test_expired_session_is_anonymous() -> None:
    client = TestClient(make_app())
    assert sign_in(client, "ann", "ann-pass") == 200
    later = TestClient(make_app(max_age_s=-1))  # same key, but every signature is now too old
    later.cookies.set("pt_test", client.cookies["pt_test"])
    assert later.get("/work").status_code == 401
