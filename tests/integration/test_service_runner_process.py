"""The four services as real processes (`python -m services.cli <service>`) under the one runner
(services/core/runner.py): a component that fails for real stops the process with exit 1 in bounded
time, SIGTERM is exit 0 (also while the broker is still unreachable), and the broker retry keeps
trying until a RabbitMQ node comes up on the configured port, then delivers what waited meanwhile."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.rabbitmq import RabbitNode
from services.core.net import free_port
from tests.support.ingest_service import AE_TITLE, drain

SERVICES = ("ingest", "inference", "labeling", "aggregator")
EXIT_BOUND_S = 90  # start-up (model load, migrations) on a loaded 2-core machine, then the exit


def http_port_var(service: str) -> str:
    return f"PT_{service.upper()}_HTTP_PORT"


def service_env(service: str, tmp_path: Path, http_port: int, amqp_url: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PT_")}
    env.update(
        PT_DATA_DIR=str(tmp_path / "var"),
        # nobody listens there: the broker component retries, the rest of the service runs
        PT_AMQP_URL=amqp_url or f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        PT_LOG_JSON="false",
        PT_SECRET_KEY=os.urandom(32).hex(),
        PT_INGEST_HOST="127.0.0.1",
        PT_INGEST_PORT=str(free_port()),
        PT_INGEST_AE_TITLE=AE_TITLE,
        PT_INFERENCE_ORT_THREADS="1",
        PYTHONPATH=os.environ.get("PYTHONPATH", ""),
    )
    env[http_port_var(service)] = str(http_port)
    return env


class ServiceProcess:
    def __init__(self, service: str, env: dict[str, str], log: Path) -> None:
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "services.cli", service],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def output(self) -> str:
        return self.log.read_text() if self.log.exists() else ""

    def wait_http(self, port: int, timeout: float = EXIT_BOUND_S) -> httpx.Response:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"exited with {self.process.returncode}:\n{self.output()[-6000:]}"
            try:
                return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5)  # 503 without a broker: serving
            except httpx.HTTPError:
                time.sleep(0.3)
        raise AssertionError(f"no HTTP answer on {port}:\n{self.output()[-6000:]}")

    def wait_log(self, text: str, timeout: float = EXIT_BOUND_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.output():
                return
            assert self.process.poll() is None, f"exited with {self.process.returncode}:\n{self.output()[-6000:]}"
            time.sleep(0.3)
        raise AssertionError(f"{text!r} not logged:\n{self.output()[-6000:]}")

    def exit_code(self, timeout: float) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s:\n{self.output()[-6000:]}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)


@pytest.fixture
def processes() -> Iterator[list[ServiceProcess]]:
    started: list[ServiceProcess] = []
    try:
        yield started
    finally:
        for proc in started:
            proc.kill()


@pytest.mark.parametrize("service", SERVICES)
def test_a_failed_component_stops_the_process_with_exit_1(
    service: str, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    """The HTTP component fails for real: its port is already taken by another socket. Before the
    runner, ingest kept running without /healthz and inference sat in its broker retry forever."""
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        proc = ServiceProcess(service, service_env(service, tmp_path, port), tmp_path / f"{service}.log")
        processes.append(proc)
        assert proc.exit_code(EXIT_BOUND_S) == 1
    finally:
        holder.close()
    out = proc.output()
    assert "component failed" in out, out[-6000:]
    assert "cannot serve HTTP" in out, out[-6000:]
    assert f"{service} stopped" in out, out  # the graceful stop ran before the exit


@pytest.mark.parametrize("service", ["ingest", "labeling", "aggregator"])
def test_a_database_that_cannot_be_migrated_stops_the_start_with_exit_1_before_anything_listens(
    service: str, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not an SQLite database\n" * 200)
    env = service_env(service, tmp_path, free_port())
    env["PT_DATABASE_URL"] = f"sqlite+aiosqlite:///{corrupt}"
    proc = ServiceProcess(service, env, tmp_path / f"{service}.log")
    processes.append(proc)
    assert proc.exit_code(EXIT_BOUND_S) == 1
    out = proc.output()
    assert "migrating database" in out and "start-up failed" in out, out[-6000:]
    assert "listening" not in out and "running" not in out, out  # no port opened before the migration


@pytest.mark.parametrize("service", SERVICES)
def test_sigterm_is_a_clean_exit_even_while_the_broker_is_unreachable(
    service: str, tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    port = free_port()
    proc = ServiceProcess(service, service_env(service, tmp_path, port), tmp_path / f"{service}.log")
    processes.append(proc)
    proc.wait_http(port)
    proc.wait_log("broker not reachable yet")  # in its retry loop: the broker is not a start-up dependency
    proc.wait_log("start-up heap frozen")  # full collections no longer walk the start-up objects
    proc.process.send_signal(signal.SIGTERM)
    assert proc.exit_code(60) == 0, proc.output()[-6000:]
    out = proc.output()
    assert f"{service} stopping" in out and f"{service} stopped" in out, out[-6000:]
    assert "component failed" not in out, out[-6000:]


def test_ingest_retries_the_broker_until_a_node_starts_then_delivers_what_waited(
    tmp_path: Path, processes: list[ServiceProcess]
) -> None:
    """The retry loop is tested against a real node that does not exist yet when ingest starts: an
    image stored meanwhile waits in the outbox and is published once the node is up."""
    from harness.dicom_peers import STORESCU, wait_for_port
    from services.ingest.tools.make_dicom import make_dicom_file

    node = RabbitNode()  # its port is chosen now; the node starts later
    http_port = free_port()
    env = service_env("ingest", tmp_path, http_port, amqp_url=node.url)
    proc = ServiceProcess("ingest", env, tmp_path / "ingest.log")
    processes.append(proc)
    try:
        assert proc.wait_http(http_port).json()["checks"]["broker"]["connected"] is False
        proc.wait_log("broker not reachable yet")
        shared = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "kermany224" / "train" / "NORMAL"
        dcm = make_dicom_file(sorted(shared.glob("*.jpeg"))[0], tmp_path / "in", transfer_syntax="explicit")
        wait_for_port("127.0.0.1", int(env["PT_INGEST_PORT"]), 30, proc.process)
        sent = subprocess.run(
            [STORESCU, "-aet", "RUNNERTEST", "-aec", AE_TITLE, "127.0.0.1", env["PT_INGEST_PORT"], str(dcm)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sent.returncode == 0, sent.stderr  # accepted while there is no broker at all
        node.start()
        deadline = time.monotonic() + 60  # back-off is capped at 5 s
        while not proc.wait_http(http_port).json()["checks"]["broker"]["connected"]:
            assert time.monotonic() < deadline, proc.output()[-6000:]
            time.sleep(0.5)
        events = asyncio.run(drain(node.url, "inference.images", expected=1, timeout=60))
        assert len(events) == 1
        proc.process.send_signal(signal.SIGTERM)
        assert proc.exit_code(60) == 0, proc.output()[-6000:]
    finally:
        proc.kill()
        node.stop()
