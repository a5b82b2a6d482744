"""The web apps as an attacker meets them (issue 14): a cookie forged with a known signing key,
password guessing, out-of-range query parameters, unknown form values, huge bodies, and pages that
would load code from the internet. Real apps on real SQLite databases, driven over ASGI."""

from __future__ import annotations

import contextlib
import re
import statistics
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from itsdangerous import URLSafeTimedSerializer
from sqlalchemy import select

from services.aggregator.models import Review, Study
from services.aggregator.service import Aggregator
from services.aggregator.users import upsert_user
from services.aggregator.web.app import COOKIE, create_app
from services.core.auth import hash_password
from services.core.db import upgrade
from services.labeling.app import LabelingService, record_job
from services.labeling.config import LabelingSettings
from services.labeling.models import Base as LabelingBase
from services.labeling.models import User as LabelingUser
from tests.support.aggregator_service import (  # noqa: F401
    apply_events,
    offline_aggregator_fixture,
    prediction,
    received,
)

PASSWORD = "pw-123456"
BIG = 50 * 1024 * 1024


def client_for(app: Any, ip: str = "10.1.1.1") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, client=(ip, 50000))
    return httpx.AsyncClient(transport=transport, base_url="http://app")


async def form_token(client: httpx.AsyncClient) -> str:
    page = await client.get("/login")
    m = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert m, page.text
    return m.group(1)


async def aggregator_login(client: httpx.AsyncClient, name: str, password: str) -> httpx.Response:
    token = await form_token(client)
    return await client.post(
        "/login", data={"username": name, "password": password, "csrf_token": token, "next": "/worklist"}
    )


async def urgent_study(agg: Aggregator) -> str:
    await apply_events(agg, received("7.1.1", "7.1"), prediction("7.1.1", 0.97, study="7.1"))
    async with agg.sessions() as s:
        assert (await s.get(Study, "7.1")).flag == "URGENT"  # type: ignore[union-attr]
    return "7.1"


# -- 1. a placeholder key must not open the worklist ------------------------------------------------


async def test_cookie_forged_with_the_signing_key_is_refused(offline_aggregator: Aggregator) -> None:
    """The attack of the review: itsdangerous, the documented salt, an existing user name and role.
    The forger reads nothing and overrules nothing; the reviewer name is the database's."""
    agg = offline_aggregator
    study = await urgent_study(agg)
    await upsert_user("dr-real", "clinician", PASSWORD, agg.settings)
    key = agg.settings.resolved_secret_key()
    forger = URLSafeTimedSerializer(key, salt=f"pt-session:{COOKIE}")
    cookie = forger.dumps({"csrf": "t", "uid": "dr-real", "role": "clinician", "name": "Dr Anyone"})
    async with client_for(create_app(agg)) as attacker:
        attacker.cookies.set(COOKIE, cookie)
        assert (await attacker.get("/api/v1/studies")).status_code == 401
        res = await attacker.post(
            f"/api/v1/studies/{study}/review",
            json={"action": "overrule", "flag": "LIKELY_HEALTHY", "comment": "forged"},
            headers={"X-CSRF-Token": "t"},
        )
        assert res.status_code in (401, 403)
    async with agg.sessions() as s:
        assert (await s.get(Study, study)).flag == "URGENT"  # type: ignore[union-attr]
        assert (await s.scalars(select(Review))).all() == []
    # a real sign-in still works, and the review carries the database's user name
    async with contextlib.aclosing(client_for(create_app(agg))) as clinician:
        assert (await aggregator_login(clinician, "dr-real", PASSWORD)).status_code == 303
        me = (await clinician.get("/api/v1/me")).json()
        assert me["user"] == "dr-real" and me["role"] == "clinician"
        res = await clinician.post(
            f"/api/v1/studies/{study}/review", json={"action": "confirm"}, headers={"X-CSRF-Token": me["csrf_token"]}
        )
        assert res.status_code == 200
    async with agg.sessions() as s:
        assert [r.reviewer for r in (await s.scalars(select(Review))).all()] == ["dr-real"]


# -- 4. user names do not leak by timing ----------------------------------------------------------


async def test_worklist_sign_in_takes_as_long_for_unknown_names(offline_aggregator: Aggregator) -> None:
    """Before: ~3 ms for an unknown name, ~36 ms for a known one (no hash computed). Now both pay one
    scrypt. Ratio of medians measured in the same run (no absolute time is asserted)."""
    agg = offline_aggregator
    await upsert_user("dr-t", "clinician", PASSWORD, agg.settings)
    async with client_for(create_app(agg)) as client:
        token = await form_token(client)

        async def timed(name: str) -> float:
            start = time.perf_counter()
            res = await client.post("/login", data={"username": name, "password": "wrong", "csrf_token": token})
            assert res.status_code == 401
            return time.perf_counter() - start

        await timed("dr-t")  # warm-up
        known, unknown = [], []
        for i in range(4):  # interleaved, so that load changes on the machine hit both alike
            known.append(await timed("dr-t"))
            unknown.append(await timed(f"ghost-{i}"))
    assert statistics.median(unknown) > 0.5 * statistics.median(known), (unknown, known)


# -- 5. throttled sign-in ------------------------------------------------------------------------


async def test_aggregator_sign_in_is_throttled_per_account_and_per_client(offline_aggregator: Aggregator) -> None:
    agg = offline_aggregator
    agg.settings.login_max_failures = 3
    agg.settings.login_max_failures_per_client = 6
    await upsert_user("dr-a", "clinician", PASSWORD, agg.settings)
    app = create_app(agg)
    async with client_for(app, "10.0.0.1") as guesser, client_for(app, "10.0.0.2") as owner:
        assert [(await aggregator_login(guesser, "dr-a", f"guess-{i}")).status_code for i in range(3)] == [401] * 3
        res = await aggregator_login(owner, "dr-a", PASSWORD)  # the account waits, whoever asks
        assert res.status_code == 429 and int(res.headers["retry-after"]) > 0
        assert "Too many failed sign-ins" in res.text and "<form" in res.text
        # the same client spraying other names (known or not) is stopped at its own budget
        codes = [(await aggregator_login(guesser, f"nobody-{i}", "x")).status_code for i in range(4)]
        assert codes == [401, 401, 401, 429]


async def labeling_app(tmp_path: Path, **settings: Any) -> tuple[Any, LabelingService]:
    service = LabelingService(LabelingSettings(data_dir=tmp_path, secret_key="test-secret", **settings))
    await upgrade(service.engine, "labeling", LabelingBase.metadata)
    await record_job(service.sessions, service.job)
    async with service.sessions() as s:
        s.add(LabelingUser(name="ann1", role="annotator", password_hash=hash_password(PASSWORD)))
        await s.commit()
    return service.web_app(), service


@pytest.fixture
async def labeling(tmp_path: Path) -> AsyncIterator[tuple[Any, LabelingService]]:
    app, service = await labeling_app(tmp_path, login_max_failures=3, http_max_body_bytes=64 * 1024)
    try:
        yield app, service
    finally:
        await service.engine.dispose()


async def test_labeling_sign_in_is_throttled(labeling: tuple[Any, LabelingService]) -> None:
    app, _ = labeling
    async with client_for(app) as client:
        token = (await client.get("/api/csrf")).json()["csrf_token"]
        headers = {"X-CSRF-Token": token}
        for _ in range(3):
            res = await client.post("/api/login", json={"name": "ann1", "password": "guess"}, headers=headers)
            assert res.status_code == 401
        res = await client.post("/api/login", json={"name": "ann1", "password": PASSWORD}, headers=headers)
        assert res.status_code == 429 and int(res.headers["retry-after"]) > 0
        assert "Too many failed sign-ins" in res.json()["detail"]
        page = await client.post("/login", data={"name": "ann1", "password": PASSWORD, "csrf_token": token})
        assert page.status_code == 429 and "Too many failed sign-ins" in page.text


# -- 6. no unhandled 500s ----------------------------------------------------------------------------


async def test_out_of_range_parameters_answer_4xx(offline_aggregator: Aggregator) -> None:
    agg = offline_aggregator
    study = await urgent_study(agg)
    await upsert_user("dr-b", "clinician", PASSWORD, agg.settings)
    async with contextlib.aclosing(client_for(create_app(agg))) as client:
        assert (await aggregator_login(client, "dr-b", PASSWORD)).status_code == 303
        for url in (
            "/api/v1/studies?page=9223372036854775807",
            "/api/v1/studies?page=1000001",
            "/api/v1/reviews?page=9223372036854775807",
            "/api/v1/studies?date_to=9999-12-31",
            "/api/v1/studies?date_from=0001-01-01",
            "/worklist?date_to=9999-12-31",
            "/worklist/rows?date_to=9999-12-31",
            "/images/x.png?frame=99999999999999999999",
        ):
            res = await client.get(url)
            assert 400 <= res.status_code < 500, (url, res.status_code, res.text[:200])
        assert (await client.get("/api/v1/studies?date_to=2999-12-31&page=100000")).status_code == 200
        me = (await client.get("/api/v1/me")).json()
        res = await client.post(
            f"/studies/{study}/review", data={"action": "delete-everything", "csrf_token": me["csrf_token"]}
        )
        assert res.status_code == 422
        assert "confirm" in res.text  # says what is allowed
        res = await client.post(f"/studies/{study}/review", data={"action": "confirm", "csrf_token": me["csrf_token"]})
        assert res.status_code == 303


# -- 7. request-size limit ------------------------------------------------------------------------------


async def test_a_50_mb_review_comment_is_refused(offline_aggregator: Aggregator) -> None:
    agg = offline_aggregator
    study = await urgent_study(agg)
    await upsert_user("dr-c", "clinician", PASSWORD, agg.settings)
    async with contextlib.aclosing(client_for(create_app(agg))) as client:
        assert (await aggregator_login(client, "dr-c", PASSWORD)).status_code == 303
        token = (await client.get("/api/v1/me")).json()["csrf_token"]
        comment = "a" * BIG
        res = await client.post(
            f"/studies/{study}/review", data={"action": "confirm", "comment": comment, "csrf_token": token}
        )
        assert res.status_code == 413
        res = await client.post(
            f"/api/v1/studies/{study}/review",
            json={"action": "confirm", "comment": comment},
            headers={"X-CSRF-Token": token},
        )
        assert res.status_code == 413

        async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted while read
            yield b'{"action": "confirm", "comment": "'
            for _ in range(BIG // (1024 * 1024)):
                yield b"a" * (1024 * 1024)
            yield b'"}'

        res = await client.post(
            f"/api/v1/studies/{study}/review",
            content=chunks(),
            headers={"X-CSRF-Token": token, "content-type": "application/json"},
        )
        assert res.status_code == 413
        # a comment over the field limit (but under the body limit) is a validation error
        res = await client.post(
            f"/api/v1/studies/{study}/review",
            json={"action": "confirm", "comment": "b" * 5000},
            headers={"X-CSRF-Token": token},
        )
        assert res.status_code == 422
    async with agg.sessions() as s:
        assert (await s.scalars(select(Review))).all() == []


async def test_labeling_refuses_huge_bodies(labeling: tuple[Any, LabelingService]) -> None:
    app, _ = labeling
    async with client_for(app) as client:
        token = (await client.get("/api/csrf")).json()["csrf_token"]
        res = await client.post(
            "/api/login", json={"name": "ann1", "password": "x" * (1024 * 1024)}, headers={"X-CSRF-Token": token}
        )
        assert res.status_code == 413


# -- 8. nothing loaded from the internet -------------------------------------------------------------


async def test_no_page_loads_assets_from_a_cdn(offline_aggregator: Aggregator) -> None:
    async with client_for(create_app(offline_aggregator)) as client:
        assert (await client.get("/api/docs")).status_code == 404
        assert (await client.get("/api/openapi.json")).json()["paths"]["/api/v1/studies"]
        for path in ("/login", "/api/docs", "/docs", "/redoc"):
            text = (await client.get(path)).text
            assert not re.search(r"https?://(cdn\.|unpkg|fonts\.g)", text), path


# -- 9. no open redirect after sign-in (services/core/login_routes.py, both apps) ------------------

OFF_SITE = [
    "//evil.example/x",
    "///evil.example",
    "/\\evil.example",
    "\\\\evil.example",
    "https://evil.example",
    "javascript:alert(1)",
    "evil.example",
    "/\t/evil.example",
    "/\n/evil.example",
    "",
]


async def sign_in_with_next(app: Any, name_field: str, name: str, target: str) -> tuple[str, httpx.Response]:
    """(the `next` the sign-in form carries for ?next=target, the response to signing in with it)."""
    async with client_for(app) as client:
        form = await client.get("/login", params={"next": target})
        m = re.search(r'name="next" value="([^"]*)"', form.text)
        assert m, form.text
        token = await form_token(client)
        data = {name_field: name, "password": PASSWORD, "csrf_token": token, "next": target}
        return m.group(1), await client.post("/login", data=data)


async def test_worklist_sign_in_never_redirects_off_site(offline_aggregator: Aggregator) -> None:
    await upsert_user("dr-n", "clinician", PASSWORD, offline_aggregator.settings)
    app = create_app(offline_aggregator)
    for target in OFF_SITE:
        form_next, res = await sign_in_with_next(app, "username", "dr-n", target)
        assert (form_next, res.status_code, res.headers["location"]) == ("/worklist", 303, "/worklist"), target
    form_next, res = await sign_in_with_next(app, "username", "dr-n", "/studies/1.2?lane=all")
    assert (form_next, res.headers["location"]) == ("/studies/1.2?lane=all", "/studies/1.2?lane=all")


async def test_labeling_sign_in_never_redirects_off_site(labeling: tuple[Any, LabelingService]) -> None:
    app, _ = labeling
    for target in OFF_SITE:
        form_next, res = await sign_in_with_next(app, "name", "ann1", target)
        assert (form_next, res.status_code, res.headers["location"]) == ("/", 303, "/"), target
    form_next, res = await sign_in_with_next(app, "name", "ann1", "/work?fb=1")
    assert (form_next, res.headers["location"]) == ("/work?fb=1", "/work?fb=1")
