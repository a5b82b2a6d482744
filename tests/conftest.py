"""Fixtures for real components: a RabbitMQ node, the shared X-ray data, headless Chromium.

Every fixture starts the real thing (installed by .ci/run / ./pt test) and stops it after.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from harness.rabbitmq import RabbitNode
from services.core.broker import Broker

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("PT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data")).resolve()
ARTIFACTS = REPO_ROOT / "test-artifacts"
# Fixtures sign cookies with short, readable keys ("test-secret"); production refuses those. The
# tests of that refusal pass allow_insecure_secrets=False explicitly (tests/unit/test_auth.py).
os.environ.setdefault("PT_ALLOW_INSECURE_SECRETS", "true")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    assert SHARED_DATA.is_dir(), f"../shared/data is required by the tests (looked in {SHARED_DATA})"
    return SHARED_DATA


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def rabbit() -> Iterator[RabbitNode]:
    """One real throwaway RabbitMQ node for the whole session (tests may stop_app/start_app it)."""
    node = RabbitNode().start()
    try:
        yield node
    finally:
        node.stop()


@pytest.fixture
async def broker(rabbit: RabbitNode) -> AsyncIterator[Broker]:
    """A connected Broker on a fresh exchange-less vhost state: queues are purged before the test."""
    b = await Broker(rabbit.url).connect()
    await purge_all(b)
    try:
        yield b
    finally:
        await b.close()


async def purge_all(b: Broker) -> None:
    from services.core.broker import CONSUMERS

    assert b.connection is not None
    channel = await b.connection.channel()
    for spec in (base.lane(lane) for base in CONSUMERS.values() for lane in ("fresh", "backfill")):
        for name in (spec.queue, spec.dlq, *(spec.retry_queue(d) for d in spec.retry_delays_ms)):
            q = await channel.get_queue(name)
            await q.purge()
    await channel.close()


CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture
def chromium() -> Iterator[object]:
    """A real headless Chromium (Debian's /usr/bin/chromium) driven by Playwright's sync API.

    Function-scoped on purpose: while the sync API is active it owns a running event loop on the
    main thread, which would break every pytest-asyncio test after it. Request it after any async
    fixture the test needs.
    """
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        try:
            yield browser
        finally:
            browser.close()
