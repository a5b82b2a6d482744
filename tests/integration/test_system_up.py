"""`./pt up` (`python -m harness up`) as a user runs it (in a fresh directory, data dir ./var): starts RabbitMQ and
the four services, says ready with the addresses, restarts a service killed with kill -9, and on
SIGINT stops everything (children first, then RabbitMQ) and exits 0."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
from pathlib import Path

import httpx

from harness.processes import HARNESS_CLI, HARNESS_ENV, SERVICES, TestProcess
from harness.system_scenario import model_env
from harness.wait import eventually
from services.core.net import free_port


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}").exists() and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()


def test_up_runs_restarts_and_stops_cleanly(tmp_path: Path) -> None:
    ports = {svc: free_port() for svc in SERVICES}
    rabbit_dir = Path(tempfile.mkdtemp(prefix="pt-up-rabbit-"))
    amqp = free_port()
    env = {
        **model_env(),
        "PT_INGEST_PORT": str(free_port()),
        **{f"PT_{svc.upper()}_HTTP_PORT": str(port) for svc, port in ports.items()},
        "PT_SYSTEM_AMQP_PORT": str(amqp),
        "PT_SYSTEM_MANAGEMENT_PORT": "0",
        # under /tmp (reachable by the rabbitmq user; pytest's own tmp dirs are not), removed below
        "PT_SYSTEM_RABBIT_DIR": str(rabbit_dir),
        "PT_SYSTEM_RESTART_BACKOFF_S": "0.5",
        "COLUMNS": "200",
        **HARNESS_ENV,
    }
    up = TestProcess("up", [*HARNESS_CLI, "up"], tmp_path / "up.log", env=env, cwd=tmp_path,
                     unset_env=("PT_AMQP_URL", "PT_DATA_DIR")).launch()  # fmt: skip
    try:
        up.wait_log(r"PneumoTriage is up", timeout=240)
        text = up.log_text()
        pids = {name: int(pid) for name, pid in re.findall(r"started (\w+) \(pid (\d+)", text)}
        assert set(pids) == set(SERVICES)
        assert f":{ports['aggregator']}/" in text and "AE PNEUMOTRIAGE" in text and "pneumotriage send" in text
        for svc, port in ports.items():
            assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=10).status_code == 200, svc
        assert (tmp_path / "var" / "logs" / "ingest.log").exists()
        assert "RabbitMQ ready" in text

        # kill -9 a service: the supervisor restarts it and it is healthy again
        os.kill(pids["inference"], signal.SIGKILL)
        m = up.wait_log(r"restarted inference \(pid (\d+)", timeout=60)
        new_pid = int(m.group(1))
        assert new_pid != pids["inference"]
        health = f"http://127.0.0.1:{ports['inference']}/healthz"
        eventually(lambda: httpx.get(health, timeout=5).status_code == 200, 120, 0.5,
                   what="the restarted inference to be healthy", ignore=(httpx.HTTPError,))  # fmt: skip

        # Ctrl-C: everything stops, children first, and `up` exits 0
        up.signal(signal.SIGINT)
        assert up.wait(timeout=180) == 0, up.tail()
        text = up.log_text()
        assert text.index("ingest stopped") < text.index("stopped.")
        for pid in [new_pid, *(p for s, p in pids.items() if s != "inference")]:
            assert not _alive(pid), f"pid {pid} survived `up`"
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", amqp)) != 0, "RabbitMQ still listening after `up` stopped"
    finally:
        if up.alive():  # a failure above: stop it the graceful way, then by force (services too)
            up.signal(signal.SIGTERM)
            try:
                up.wait(timeout=150)
            except subprocess.TimeoutExpired:
                up.kill9()
                for pid in re.findall(r"(?:started|restarted) \w+ \(pid (\d+)", up.log_text()):
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(int(pid), signal.SIGKILL)
        shutil.rmtree(rabbit_dir, ignore_errors=True)
