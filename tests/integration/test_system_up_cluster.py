"""`./pt up --replicas N --cluster`: the production topology rehearsed on one machine
(a throwaway 3-node RabbitMQ cluster with quorum queues, a PostgreSQL server, N processes of every
service on their own ports); and the refusal of replicas without PostgreSQL."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
from pathlib import Path

import httpx
import pytest

from harness.processes import HARNESS_CLI, HARNESS_ENV, SERVICES, TestProcess
from harness.system_scenario import model_env
from services.core.net import free_port
from tests.integration.test_system_up import _alive

UNSET = ("PT_AMQP_URL", "PT_DATA_DIR", "PT_DATABASE_URL")  # the test's own settings; `up` makes them


def _env(ports: dict[str, int], dicom: int) -> dict[str, str]:
    env = {
        **os.environ,
        **model_env(),
        "PT_INGEST_PORT": str(dicom),
        **{f"PT_{svc.upper()}_HTTP_PORT": str(port) for svc, port in ports.items()},
        "PT_SYSTEM_MANAGEMENT_PORT": "0",
        "COLUMNS": "250",
        **HARNESS_ENV,
    }
    for key in UNSET:
        env.pop(key, None)
    return env


def test_replicas_without_postgres_are_refused(tmp_path: Path) -> None:
    res = subprocess.run(
        [*HARNESS_CLI, "up", "--replicas", "2"],
        cwd=tmp_path,
        env=_env({svc: free_port() for svc in SERVICES}, free_port()),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 2
    assert "needs PostgreSQL" in res.stdout


@pytest.mark.slow
@pytest.mark.postgres
def test_up_cluster_with_two_replicas(tmp_path: Path) -> None:
    # replica k listens on port + 100·(k-1): pick base ports whose +100 is free too
    ports = {svc: free_port() for svc in SERVICES}
    dicom = free_port()
    up = TestProcess("up", [*HARNESS_CLI, "up", "--cluster", "--replicas", "2"], tmp_path / "up.log",
                     env=_env(ports, dicom), cwd=tmp_path, unset_env=UNSET).launch()  # fmt: skip
    pids: dict[str, int] = {}
    try:
        up.wait_log(r"PneumoTriage is up", timeout=420)
        text = up.log_text()
        pids = {name: int(pid) for name, pid in re.findall(r"started ([\w-]+) \(pid (\d+)", text)}
        assert set(pids) == set(SERVICES) | {f"{svc}-2" for svc in SERVICES}
        assert "RabbitMQ cluster ready" in text and "PostgreSQL ready" in text and "quorum queues" in text
        for svc, port in ports.items():
            for p in (port, port + 100):
                assert httpx.get(f"http://127.0.0.1:{p}/healthz", timeout=10).status_code == 200, (svc, p)
        for p in (dicom, dicom + 1):  # two ingest SCPs, one AE title
            echo = subprocess.run(["/usr/bin/echoscu", "-aec", "PNEUMOTRIAGE", "127.0.0.1", str(p)], timeout=60)
            assert echo.returncode == 0, p
        assert not list((tmp_path / "var").glob("*.db")), "every service is on PostgreSQL"
        up.signal(signal.SIGINT)
        assert up.wait(timeout=240) == 0, up.tail()
        for pid in pids.values():
            assert not _alive(pid), f"pid {pid} survived `up`"
    finally:
        if up.alive():
            up.signal(signal.SIGTERM)
            try:
                up.wait(timeout=200)
            except subprocess.TimeoutExpired:
                up.kill9()
                for pid in pids.values():
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(pid, signal.SIGKILL)
