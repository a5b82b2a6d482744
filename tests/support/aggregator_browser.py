"""The real aggregator service (`pneumotriage aggregator` in a subprocess) on the session's
RabbitMQ, with users created by the real CLI, for the browser tests; and a sync publisher."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.processes import CLI, TestProcess
from harness.rabbitmq import RabbitNode
from services.core.broker import Broker
from services.core.net import free_port
from tests.support.aggregator_service import publish, write_test_policy

PASSWORD = "correct horse battery"


def run_async(coro: Any) -> Any:
    """Run a coroutine to completion in a fresh thread (Playwright's sync API owns this thread's loop)."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(coro)
        except BaseException as exc:  # re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=target)
    t.start()
    t.join(120)
    if "error" in box:
        raise box["error"]
    return box.get("value")


@dataclass
class AggregatorServer:
    url: str
    amqp_url: str
    data_dir: Path
    env: dict[str, str]

    def publish(self, *messages: Any) -> None:
        async def go() -> None:
            broker = await Broker(self.amqp_url).connect()
            try:
                for msg in messages:
                    await publish(broker, msg)
            finally:
                await broker.close()

        run_async(go())

    def add_user(self, name: str, role: str) -> None:
        if role in ("clinician", "admin"):  # through the real CLI
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "services.cli",
                    "aggregator",
                    "add-user",
                    name,
                    "--role",
                    role,
                    "--password",
                    PASSWORD,
                ],
                env=self.env,
                check=True,
                capture_output=True,
                timeout=120,
            )
        else:  # the CLI refuses other roles; put one in the table as a misconfigured account would be
            from services.aggregator.config import AggregatorSettings
            from services.aggregator.users import upsert_user

            run_async(upsert_user(name, role, PASSWORD, AggregatorSettings(data_dir=self.data_dir)))

    def heatmap(self, name: str, center: tuple[float, float]) -> str:
        """A generated class-activation-like map (.npy) the Prediction can point to."""
        yy, xx = np.mgrid[0:28, 0:28] / 27.0
        arr = np.exp(-(((xx - center[0]) ** 2) + ((yy - center[1]) ** 2)) / 0.02).astype(np.float32)
        path = self.data_dir / f"{name}.npy"
        np.save(path, arr)
        return path.as_uri()


@pytest.fixture(name="aggregator_server", scope="module")
def aggregator_server_fixture(
    rabbit: RabbitNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[AggregatorServer]:
    data_dir = tmp_path_factory.mktemp("aggregator-web")
    port = free_port()
    env = dict(os.environ)
    env.update(
        PT_DATA_DIR=str(data_dir),
        PT_AMQP_URL=rabbit.url,
        PT_AGGREGATOR_HTTP_PORT=str(port),
        PT_AGGREGATOR_POLICY_FILE=str(write_test_policy(data_dir / "policy.yaml")),
        PT_AGGREGATOR_SSE_INTERVAL_SECONDS="0.5",
        PT_SECRET_KEY="browser-test-secret",
        PT_LOG_LEVEL="INFO",
    )
    rabbit.ctl("purge_queue", "aggregator.events", check=False)  # leftovers of other tests are not ours
    proc = TestProcess(
        "aggregator",
        [*CLI, "aggregator"],
        data_dir / "aggregator.log",
        env=env,
        health_url=f"http://127.0.0.1:{port}/healthz",
    ).launch()
    server = AggregatorServer(f"http://127.0.0.1:{port}", rabbit.url, data_dir, env)
    try:
        proc.wait_healthy(90)
        yield server
    finally:
        proc.stop(30)


class BrowserThread:
    """Headless Chromium (Debian's, the same launch flags as the `chromium` fixture) driven by
    Playwright's sync API on a dedicated thread.

    Playwright's sync API keeps an asyncio loop *running* on the thread that started it for as long as
    it lives; on the main thread that breaks every later pytest-asyncio test of the session
    ("Runner.run() cannot be called from a running event loop"). On its own thread it cannot.
    """

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._executor = ThreadPoolExecutor(1, thread_name_prefix="playwright")
        self._manager: Any = None
        self.browser: Any = None

    def _start(self) -> None:
        from playwright.sync_api import sync_playwright

        from tests.conftest import CHROMIUM_ARGS

        self._manager = sync_playwright()
        playwright = self._manager.__enter__()
        chromium = playwright.chromium
        self.browser = chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)

    def _stop(self) -> None:
        try:
            if self.browser is not None:
                self.browser.close()
        finally:
            if self._manager is not None:
                self._manager.__exit__(None, None, None)

    def start(self) -> BrowserThread:
        self._executor.submit(self._start).result(180)
        return self

    def run(self, scenario: Any, *args: Any, timeout: float = 400) -> Any:
        """Run scenario(browser, *args) on the browser's thread; its exceptions re-raise here."""
        return self._executor.submit(scenario, self.browser, *args).result(timeout)

    def stop(self) -> None:
        try:
            self._executor.submit(self._stop).result(120)
        finally:
            self._executor.shutdown(wait=True)


@pytest.fixture(name="aggregator_chromium", scope="module")
def aggregator_chromium_fixture() -> Iterator[BrowserThread]:
    browser = BrowserThread().start()
    try:
        yield browser
    finally:
        browser.stop()
