"""Signing out ends the session on the server (issue 22, item 8): a copy of the cookie taken before
sign-out is refused afterwards, well before its 12 h max-age, by every replica sharing the database.

Each "replica" is its own service object with its own engine (its own connections) on one database,
as separate processes would be: one SQLite file, and one PostgreSQL database."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from services.aggregator.config import AggregatorSettings
from services.aggregator.service import Aggregator
from services.aggregator.users import upsert_user
from services.aggregator.web.app import COOKIE, create_app
from services.core.auth import hash_password
from services.core.db import upgrade
from services.labeling.app import LabelingService, record_job
from services.labeling.config import LabelingSettings
from services.labeling.models import Base as LabelingBase
from services.labeling.models import User as LabelingUser
from tests.support.aggregator_service import write_test_policy
from tests.support.postgres import PostgresServer, postgres  # noqa: F401

PASSWORD = "pw-123456"
LABELING_COOKIE = "pt_labeling"


def client_for(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://app")


@pytest.fixture(params=["sqlite", "postgresql"])
async def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str | None:
    """None: the default (one SQLite file per service under the data dir, shared by both replicas)."""
    if request.param == "sqlite":
        return None
    server: PostgresServer = request.getfixturevalue("postgres")
    name = f"pt_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(server.dsn)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return f"postgresql+asyncpg://postgres@127.0.0.1:{server.port}/{name}"


@contextlib.asynccontextmanager
async def aggregator_replicas(tmp_path: Path, url: str | None) -> AsyncIterator[list[Aggregator]]:
    policy = write_test_policy(tmp_path / "policy.yaml")
    settings = AggregatorSettings(data_dir=tmp_path, policy_file=policy, secret_key="test-secret", database_url=url)
    replicas = [Aggregator(settings) for _ in range(2)]
    try:
        await replicas[0].migrate()
        yield replicas
    finally:
        for agg in replicas:
            await agg.engine.dispose()


@contextlib.asynccontextmanager
async def labeling_replicas(tmp_path: Path, url: str | None) -> AsyncIterator[list[LabelingService]]:
    replicas = [
        LabelingService(LabelingSettings(data_dir=tmp_path, secret_key="test-secret", database_url=url))
        for _ in range(2)
    ]
    try:
        await upgrade(replicas[0].engine, "labeling", LabelingBase.metadata)
        await record_job(replicas[0].sessions, replicas[0].job)
        async with replicas[0].sessions() as s:
            s.add(LabelingUser(name="ann1", role="annotator", password_hash=hash_password(PASSWORD)))
            await s.commit()
        yield replicas
    finally:
        for service in replicas:
            await service.engine.dispose()


async def form_token(client: httpx.AsyncClient) -> str:
    page = await client.get("/login")
    m = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert m, page.text
    return m.group(1)


async def replayed(app: Any, cookie_name: str, cookie: str, path: str) -> tuple[int, int, str]:
    """(JSON status, browser status, browser redirect) of `path` with nothing but the copied cookie."""
    async with client_for(app) as attacker:
        attacker.cookies.set(cookie_name, cookie)
        api = await attacker.get(path)
        page = await attacker.get(path, headers={"Accept": "text/html"})
    return api.status_code, page.status_code, page.headers.get("location", "")


async def check_logout_revokes(
    apps: list[Any],
    cookie_name: str,
    sign_in: Callable[[httpx.AsyncClient], Any],
    protected: str,
) -> None:
    replica_a, replica_b = apps
    async with client_for(replica_a) as browser:
        await sign_in(browser)
        cookie = browser.cookies[cookie_name]
        assert (await browser.get(protected)).status_code == 200
        assert (await replayed(replica_b, cookie_name, cookie, protected))[0] == 200  # valid on the other replica
        token = await form_token(browser)
        out = await browser.post("/logout", data={"csrf_token": token})
        assert out.status_code == 303 and out.headers["location"] == "/login"
        assert (await browser.get(protected)).status_code == 401
    # the copy taken before sign-out: refused by both replicas, JSON (401) and browser (to sign-in)
    for app in (replica_a, replica_b):
        api, page, location = await replayed(app, cookie_name, cookie, protected)
        assert api == 401, f"replayed cookie answered {api} after sign-out"
        assert page == 303 and location.startswith("/login"), (page, location)
    # signing in again gives a working session
    async with client_for(replica_b) as browser:
        await sign_in(browser)
        assert (await browser.get(protected)).status_code == 200
        assert (await replayed(replica_a, cookie_name, browser.cookies[cookie_name], protected))[0] == 200


async def test_worklist_logout_revokes_the_cookie_on_every_replica(tmp_path: Path, database_url: str | None) -> None:
    async with aggregator_replicas(tmp_path, database_url) as replicas:
        await upsert_user("dr-a", "clinician", PASSWORD, replicas[0].settings)

        async def sign_in(client: httpx.AsyncClient) -> None:
            token = await form_token(client)
            data = {"username": "dr-a", "password": PASSWORD, "csrf_token": token, "next": "/worklist"}
            assert (await client.post("/login", data=data)).status_code == 303

        await check_logout_revokes([create_app(agg) for agg in replicas], COOKIE, sign_in, "/api/v1/me")


async def test_labeling_logout_revokes_the_cookie_on_every_replica(tmp_path: Path, database_url: str | None) -> None:
    async with labeling_replicas(tmp_path, database_url) as replicas:

        async def sign_in(client: httpx.AsyncClient) -> None:
            token = (await client.get("/api/csrf")).json()["csrf_token"]
            res = await client.post(
                "/api/login", json={"name": "ann1", "password": PASSWORD}, headers={"X-CSRF-Token": token}
            )
            assert res.status_code == 200, res.text

        await check_logout_revokes([s.web_app() for s in replicas], LABELING_COOKIE, sign_in, "/api/me")
