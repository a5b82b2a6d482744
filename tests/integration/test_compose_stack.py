"""docker-compose.yml for real (issue 25): `./pt compose-check` as a test. Slow and needs a Docker
daemon (DOCKER_HOST), docker-compose or `docker compose`, dcmtk, and root for the offline base image:
deselected by default, run with `pytest -m slow tests/integration/test_compose_stack.py`."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from harness.system_config_refs import REPO

pytestmark = pytest.mark.slow


def docker_ready() -> bool:
    if shutil.which("docker") is None or not (shutil.which("docker-compose") or shutil.which("docker")):
        return False
    return subprocess.run(["docker", "info"], capture_output=True, timeout=30).returncode == 0


@pytest.mark.timeout(3600)
def test_compose_stack_flags_a_study_and_survives_losing_inference() -> None:
    if not docker_ready():
        pytest.skip("no Docker daemon (see ../shared/RUNTIME-NOTES.md, Docker)")
    if not os.path.exists("/usr/bin/storescu"):
        pytest.skip("dcmtk's storescu (apt-get install dcmtk)")
    res = subprocess.run(
        [sys.executable, str(REPO / "deploy/docker/compose_check.py")], capture_output=True, text=True, timeout=3500
    )
    out = res.stdout
    report = json.loads(out[out.rindex("\n{") :]) if "\n{" in out else {}
    assert res.returncode == 0 and report.get("ok"), out[-4000:] + res.stderr[-4000:]
    assert report["first_flag"] and report["after_kill_flag"]
    assert set(report["prometheus"]) >= {"ingest", "inference", "labeling", "aggregator", "rabbitmq", "triton"}
    assert all(v == "up" for v in report["prometheus"].values())
