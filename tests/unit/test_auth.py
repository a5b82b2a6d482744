"""services.core.auth: password hashes, signed sessions, roles and CSRF on a real FastAPI app."""

from __future__ import annotations

import re
import secrets
import statistics
import time
from pathlib import Path

import pytest
from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, PlainTextResponse
from fastapi.testclient import TestClient
from itsdangerous import URLSafeTimedSerializer

from services.core.auth import (
    Account,
    AuthSettings,
    InsecureSecretError,
    LoginThrottle,
    SessionUser,
    WebSessions,
    csrf_token,
    hash_password,
    require_csrf,
    secret_problem,
    verify_password,
)

USERS = {"ann": ("annotator", hash_password("ann-pass")), "own": ("owner", hash_password("own-pass"))}
DISABLED: set[str] = set()


async def find(name: str) -> Account | None:
    if name not in USERS or name in DISABLED:
        return None
    role, stored = USERS[name]
    return Account(id=name, role=role, name=name, password_hash=stored)


def make_app(secret: str = "test-secret", max_age_s: int = 3600, throttle: LoginThrottle | None = None) -> FastAPI:
    app = FastAPI()
    sessions = WebSessions(
        secret,
        "pt_test",
        find_account=find,
        load_account=find,
        max_age_s=max_age_s,
        throttle=throttle or LoginThrottle(per_account=1000, per_client=1000),
    )
    sessions.install(app)

    @app.get("/login")
    async def login_form(request: Request) -> HTMLResponse:
        return HTMLResponse(f'<form><input name="csrf_token" value="{csrf_token(request)}"></form>')

    @app.post("/login", dependencies=[Depends(require_csrf)])
    async def login(request: Request, name: str = Form(), password: str = Form()) -> PlainTextResponse:
        if await sessions.sign_in(request, name, password) is None:
            return PlainTextResponse("no", status_code=401)
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


def test_deleted_user_loses_the_session() -> None:
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


# -- a leaked or placeholder signing key --------------------------------------------------------------


def forge(secret: str, payload: dict[str, str]) -> str:
    """What an attacker who knows the key (and the documented salt) can sign."""
    return str(URLSafeTimedSerializer(secret, salt="pt-session:pt_test").dumps(payload))


def test_cookie_forged_with_the_key_names_nobody() -> None:
    # The attacker knows the key, a user name and its role, but not the user's salted password hash.
    forged = TestClient(make_app())
    forged.cookies.set("pt_test", forge("test-secret", {"csrf": "t", "uid": "own", "role": "owner", "name": "own"}))
    assert forged.get("/owner").status_code == 401
    guessed = TestClient(make_app())
    guessed.cookies.set("pt_test", forge("test-secret", {"csrf": "t", "uid": "own", "auth": "0" * 64}))
    assert guessed.get("/owner").status_code == 401


def test_role_and_name_come_from_the_database_not_the_cookie() -> None:
    client = TestClient(make_app())
    assert sign_in(client, "ann", "ann-pass") == 200
    session = URLSafeTimedSerializer("test-secret", salt="pt-session:pt_test").loads(client.cookies["pt_test"])
    assert set(session) == {"csrf", "uid", "auth"}  # no role or name to trust
    # re-signed with an owner role and another name (the key is known): still the annotator "ann"
    escalated = TestClient(make_app())
    escalated.cookies.set("pt_test", forge("test-secret", {**session, "role": "owner", "name": "own"}))
    assert escalated.get("/owner").status_code == 403
    assert escalated.get("/work").text == "work for ann"


def test_password_change_ends_every_session() -> None:
    client = TestClient(make_app())
    assert sign_in(client, "ann", "ann-pass") == 200
    old = USERS["ann"]
    USERS["ann"] = ("annotator", hash_password("new-pass"))
    try:
        assert client.get("/work").status_code == 401
    finally:
        USERS["ann"] = old


PLACEHOLDER_IN_MANIFEST = next(
    line.split(":", 1)[1].strip()
    for line in (Path(__file__).resolve().parents[2] / "deploy/k8s/secrets.yaml").read_text().splitlines()
    if line.strip().startswith("PT_SECRET_KEY:")
)


@pytest.mark.parametrize(
    "key",
    [
        PLACEHOLDER_IN_MANIFEST,
        "change-me-to-a-long-random-string",
        "test-secret",
        "x" * 64,
        "too-short-but-random-7f3a",
    ],
)
def test_placeholder_or_short_secret_is_refused(key: str) -> None:
    with pytest.raises(InsecureSecretError, match="PT_SECRET_KEY is refused"):
        AuthSettings(secret_key=key, allow_insecure_secrets=False).resolved_secret_key()
    # an explicit dev mode accepts it (with a warning)
    assert AuthSettings(secret_key=key, allow_insecure_secrets=True).resolved_secret_key() == key


def test_a_random_key_is_accepted_and_an_unset_one_is_random() -> None:
    key = secrets.token_hex(32)
    assert AuthSettings(secret_key=key, allow_insecure_secrets=False).resolved_secret_key() == key
    unset = AuthSettings(secret_key=None, allow_insecure_secrets=False)
    assert secret_problem(unset.resolved_secret_key()) is None


def test_env_example_ships_no_usable_secret() -> None:
    example = (Path(__file__).resolve().parents[2] / ".env.example").read_text()
    values = dict(
        line.split("=", 1) for line in example.splitlines() if "=" in line and not line.lstrip().startswith("#")
    )
    assert secret_problem(values["PT_SECRET_KEY"]) is not None  # must be replaced, or the service refuses


# -- sign-in throttling -----------------------------------------------------------------------------


def test_throttle_window_per_account_and_per_client() -> None:
    t = LoginThrottle(per_account=3, per_client=5, window_s=60)
    for i in range(3):
        assert t.retry_after("Ann", "10.0.0.1", now=100.0 + i) is None
        t.failed("Ann", "10.0.0.1", now=100.0 + i)
    # the account (names compare case-insensitively) is throttled from any address
    assert t.retry_after("ann", "10.0.0.9", now=103.0) == pytest.approx(57.0)
    assert t.retry_after("ann", "10.0.0.9", now=160.5) is None  # the oldest failure left the window
    # the client is throttled whatever name it tries (unknown names count the same)
    t.failed("nobody-1", "10.0.0.1", now=104.0)
    t.failed("nobody-2", "10.0.0.1", now=105.0)
    assert t.retry_after("someone-else", "10.0.0.1", now=106.0) == pytest.approx(54.0)  # 100 + 60 - 106
    assert t.retry_after("someone-else", "10.0.0.2", now=106.0) is None


def test_sign_in_is_throttled_with_429_and_retry_after() -> None:
    client = TestClient(make_app(throttle=LoginThrottle(per_account=3, per_client=100, window_s=300)))
    assert [sign_in(client, "ann", "wrong") for _ in range(3)] == [401, 401, 401]
    token = token_from(client)
    res = client.post("/login", data={"name": "ann", "password": "ann-pass", "csrf_token": token})
    assert res.status_code == 429  # even the right password waits: no oracle for a guesser
    assert 290 <= int(res.headers["retry-after"]) <= 300
    assert "Too many failed sign-ins" in res.json()["detail"]
    assert sign_in(client, "own", "own-pass") == 200  # other accounts are not locked


def test_unknown_user_costs_a_password_hash() -> None:
    """The one sign-in path hashes a dummy password for unknown names: as slow as a wrong password
    for a known user (without it an unknown name answers ~10x faster). Ratio of medians, same run."""
    client = TestClient(make_app())
    token = token_from(client)

    def timed(name: str) -> float:
        start = time.perf_counter()
        res = client.post("/login", data={"name": name, "password": "wrong", "csrf_token": token})
        assert res.status_code == 401
        return time.perf_counter() - start

    timed("ann")  # warm-up
    known, unknown = [], []
    for i in range(5):  # interleaved, so that load changes on the machine hit both alike
        known.append(timed("ann"))
        unknown.append(timed(f"ghost-{i}"))
    assert statistics.median(unknown) > 0.5 * statistics.median(known), (unknown, known)
