"""The services as processes: they refuse a placeholder session key before serving anything, and
the labeling service exits non-zero when one of its components dies (so a supervisor restarts it
instead of reading the failure as a clean stop)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from harness.processes import CLI, TestProcess
from harness.rabbitmq import RabbitNode
from services.core.broker import CONSUMERS, Broker
from services.core.net import free_port

PLACEHOLDER = "change-me-to-a-long-random-string"  # the value shipped in deploy/k8s/secrets.yaml


def service_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PT_")}
    env.update(
        PT_DATA_DIR=str(tmp_path / "var"),
        PT_AMQP_URL=f"amqp://guest:guest@127.0.0.1:{free_port()}/",  # nobody there: the broker loop retries
        PT_LOG_JSON="false",
        PYTHONPATH=os.environ.get("PYTHONPATH", ""),
    )
    env.update(extra)
    return env


def run_until_exit(args: list[str], env: dict[str, str], timeout: float = 90) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "services.cli", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize("service", ["aggregator", "labeling"])
def test_placeholder_secret_key_stops_the_service(tmp_path: Path, service: str) -> None:
    env = service_env(
        tmp_path,
        PT_SECRET_KEY=PLACEHOLDER,
        PT_ALLOW_INSECURE_SECRETS="false",
        PT_AGGREGATOR_HTTP_PORT=str(free_port()),
        PT_LABELING_HTTP_PORT=str(free_port()),
    )
    res = run_until_exit([service], env)
    assert res.returncode != 0
    assert "PT_SECRET_KEY is refused: it is a known placeholder" in res.stdout + res.stderr


async def test_labeling_exits_non_zero_when_a_component_dies(tmp_path: Path, rabbit: RabbitNode) -> None:
    """The broker component dies for real: another client holds an exclusive consumer on
    labeling.images, so the service's basic.consume is refused (ACCESS_REFUSED)."""
    vhost = f"pt-exit-{uuid.uuid4().hex[:8]}"
    rabbit.ctl("add_vhost", vhost)
    rabbit.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    url = f"amqp://guest:guest@127.0.0.1:{rabbit.port}/{vhost}"
    holder = await Broker(url).connect()
    try:
        assert holder.connection is not None
        channel = await holder.connection.channel()
        queue = await channel.get_queue(CONSUMERS["labeling"].queue)

        async def hold(_message: object) -> None:
            return None

        await queue.consume(hold, exclusive=True)
        env = service_env(
            tmp_path, PT_SECRET_KEY=os.urandom(32).hex(), PT_LABELING_HTTP_PORT=str(free_port()), PT_AMQP_URL=url
        )
        res = await asyncio.to_thread(run_until_exit, ["labeling"], env)
    finally:
        await holder.close()
        rabbit.ctl("delete_vhost", vhost, check=False)
    output = res.stdout + res.stderr
    assert "component failed" in output, output[-3000:]
    assert res.returncode == 1, output[-3000:]


def test_labeling_exits_zero_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = service_env(tmp_path, PT_SECRET_KEY=os.urandom(32).hex(), PT_LABELING_HTTP_PORT=str(port))
    unset = [k for k in os.environ if k.startswith("PT_") and k not in env]  # none of the test's own settings
    proc = TestProcess("labeling", [*CLI, "labeling"], tmp_path / "labeling.log", env=env, unset_env=unset).launch()
    try:
        proc.wait_answering(f"http://127.0.0.1:{port}/healthz", 90)  # 503 without a broker: serving
        proc.signal(signal.SIGTERM)
        assert proc.wait(60) == 0, proc.tail()
    finally:
        proc.stop()
