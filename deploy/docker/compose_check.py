"""End-to-end check of docker-compose.yml on this host (operator command: `./pt compose-check`).

Builds every image (from the offline Debian base of deploy/docker/base-image.sh unless
PT_BASE_IMAGE names another), starts the stack with throwaway random secrets under its own project
name, waits for every health check, C-STOREs a study to the published DICOM port with dcmtk's
storescu, reads its flag through the aggregator's JSON API, checks that Prometheus scrapes every
service, kills the inference containers and sees the next study flagged once they are back, then
`down -v`. Prints cold build time and C-STORE -> first flag; exit 0 when all of it held.
Needs: a Docker daemon (DOCKER_HOST), docker-compose (v1) or `docker compose` (v2), dcmtk, root
for debootstrap on the first run. The published host ports are the compose file's (11112, 8001,
8003, 8004, 5672, 15672, 9090): they must be free.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
PROJECT = os.environ.get("PT_COMPOSE_PROJECT", "ptcheck")
# every scrape job of deploy/prometheus/prometheus.yml (the services' found by DNS, a few scrapes in)
EXPECTED_JOBS = {"ingest", "inference", "labeling", "aggregator", "rabbitmq", "rabbitmq-queues", "triton"}
DATA = Path(os.environ.get("PT_DATA_ROOT", REPO.parent / "shared" / "data"))


def log(msg: str) -> None:
    print(f"[compose-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def compose_cmd() -> list[str]:
    if subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    sys.exit("no docker compose (v2) or docker-compose (v1)")


class Stack:
    def __init__(self, env_file: Path) -> None:
        self.base = [*compose_cmd(), "--project-name", PROJECT, "--env-file", str(env_file),
                     "-f", str(REPO / "docker-compose.yml")]  # fmt: skip

    def run(self, *args: str, check: bool = True, capture: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*self.base, *args], cwd=REPO, check=check, text=True, capture_output=capture)

    def containers(self, service: str | None = None) -> list[str]:
        out = self.run("ps", "-q", *([service] if service else []), capture=True).stdout.split()
        return [c for c in out if c]


def health(container: str) -> str:
    out = subprocess.run(["docker", "inspect", "-f", "{{.Name}} {{.State.Status}} {{if .State.Health}}"
                          "{{.State.Health.Status}}{{else}}none{{end}}", container],
                         capture_output=True, text=True).stdout.split()  # fmt: skip
    return out[2] if len(out) == 3 and out[1] == "running" else (out[1] if len(out) > 1 else "gone")


def wait_healthy(stack: Stack, timeout: float, services: tuple[str, ...] = ()) -> None:
    deadline = time.monotonic() + timeout
    while True:
        ids = [c for s in services for c in stack.containers(s)] if services else stack.containers()
        states = {c[:12]: health(c) for c in ids}
        if ids and all(v in ("healthy", "none") for v in states.values()):
            return
        if time.monotonic() > deadline:
            stack.run("ps", check=False)
            raise RuntimeError(f"not healthy after {timeout:.0f}s: {states}")
        time.sleep(3)


def store(path: Path) -> None:
    env = dict(os.environ, TCP_NODELAY="1")
    subprocess.run(["/usr/bin/storescu", "-aec", "PNEUMOTRIAGE", "-R", "127.0.0.1", "11112", str(path)],
                   check=True, env=env)  # fmt: skip


def study_uid(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def signed_in_client(stack: Stack) -> httpx.Client:
    user, password = "compose-check", secrets.token_hex(16)
    stack.run("exec", "-T", "aggregator", "pneumotriage", "aggregator", "add-user", user, "--role", "clinician",
              "--password", password)  # fmt: skip
    client = httpx.Client(base_url="http://127.0.0.1:8004", timeout=10)
    import re

    page = client.get("/login").text
    token = re.search(r'name="csrf_token" value="([^"]+)"', page)
    form = {"username": user, "password": password, "next": "/worklist"}
    if token:
        form["csrf_token"] = token.group(1)
    res = client.post("/login", data=form)
    if res.status_code not in (200, 303):
        raise RuntimeError(f"sign-in failed: {res.status_code} {res.text[:200]}")
    return client


def wait_flag(client: httpx.Client, uid: str, timeout: float) -> tuple[str, float]:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        res = client.get(f"/api/v1/studies/{uid}")
        if res.status_code == 200:
            body = res.json()
            flag = body.get("flag")
            if flag and flag != "PENDING":  # PENDING: no evidence yet, never published
                return str(flag), time.monotonic() - start
        time.sleep(0.5)
    raise RuntimeError(f"study {uid}: no flag after {timeout:.0f}s")


def prometheus_targets(timeout: float) -> dict[str, str]:
    deadline = time.monotonic() + timeout
    jobs: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            data = httpx.get("http://127.0.0.1:9090/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        except (httpx.HTTPError, KeyError, ValueError):
            time.sleep(3)
            continue
        jobs = {}
        for t in data:
            job = t["labels"]["job"]
            jobs[job] = "up" if jobs.get(job, "up") == "up" and t["health"] == "up" else t["health"]
        if set(jobs) >= EXPECTED_JOBS and all(v == "up" for v in jobs.values()):
            return jobs
        time.sleep(3)
    raise RuntimeError(f"Prometheus targets not all up: {jobs}")


def main() -> int:
    results: dict[str, object] = {}
    if not os.environ.get("PT_BASE_IMAGE"):
        subprocess.run([str(REPO / "deploy/docker/base-image.sh")], check=True)
        os.environ["PT_BASE_IMAGE"] = "pneumotriage-base:bookworm"
    work = Path(tempfile.mkdtemp(prefix="pt-compose-check-"))
    env_file = work / "env"
    keys = ("PT_SECRET_KEY", "PT_RABBITMQ_PASSWORD", "PT_POSTGRES_PASSWORD", "PT_GRAFANA_PASSWORD")
    lines = [f"{k}={secrets.token_hex(32)}" for k in keys] + [f"PT_BASE_IMAGE={os.environ['PT_BASE_IMAGE']}"]
    env_file.write_text("\n".join(lines) + "\n")
    stack = Stack(env_file)
    # two fresh studies (today's date: the fresh lane) from the chest X-rays the project trains on
    jpegs = sorted((DATA / "kermany224").rglob("*.jpeg"))[:2]
    if len(jpegs) < 2:
        sys.exit(f"need two chest X-ray JPEGs under {DATA / 'kermany224'}")
    subprocess.run([str(Path(sys.executable).parent / "pneumotriage"), "make-dicom", *map(str, jpegs), "--out",
                    str(work / "dicom"), "--uid-salt", secrets.token_hex(4)], check=True)  # fmt: skip
    samples = sorted((work / "dicom").rglob("*.dcm"))
    try:
        t0 = time.monotonic()
        stack.run("build")
        results["build_s"] = round(time.monotonic() - t0, 1)
        log(f"build: {results['build_s']} s")
        t0 = time.monotonic()
        stack.run("up", "-d", "--scale", "inference=2")
        wait_healthy(stack, 300)
        results["healthy_s"] = round(time.monotonic() - t0, 1)
        log(f"all healthy after {results['healthy_s']} s")
        client = signed_in_client(stack)
        store(samples[0])
        flag, first = wait_flag(client, study_uid(samples[0]), 120)
        results["first_flag"] = flag
        results["first_flag_s"] = round(first, 2)
        log(f"first study flagged {flag} {first:.2f} s after storescu returned")
        results["prometheus"] = prometheus_targets(90)
        log(f"Prometheus targets: {results['prometheus']}")
        inference = stack.containers("inference")
        subprocess.run(["docker", "kill", *inference], check=True, capture_output=True)
        results["inference_after_kill"] = {c[:12]: health(c) for c in inference}
        log(f"killed {len(inference)} inference container(s) {results['inference_after_kill']}; storing a second study")
        t_store = time.monotonic()
        store(samples[1])
        # Nothing can flag it while no inference runs. Docker's restart policy does not restart a container
        # stopped by `docker kill` (a crash it does restart): start them, as an operator or k8s would.
        time.sleep(8)
        early = client.get(f"/api/v1/studies/{study_uid(samples[1])}")
        results["flag_while_inference_down"] = early.json().get("flag") if early.status_code == 200 else None
        subprocess.run(["docker", "start", *inference], check=True, capture_output=True)
        log(f"flag while inference was down: {results['flag_while_inference_down']}; inference started again")
        flag2, _ = wait_flag(client, study_uid(samples[1]), 240)
        second = time.monotonic() - t_store
        restarts = subprocess.run(["docker", "inspect", "-f", "{{.RestartCount}}", *inference],
                                  capture_output=True, text=True).stdout.split()  # fmt: skip
        results["after_kill_flag"] = flag2
        results["after_kill_s"] = round(second, 2)
        results["inference_restarts"] = restarts
        log(f"study stored after the kill: {flag2} {second:.1f} s after storescu (restarts {restarts})")
        results["ok"] = True
    except Exception as exc:  # report, then tear down
        results["ok"] = False
        results["error"] = str(exc)
        stack.run("logs", "--tail", "40", check=False)
    finally:
        stack.run("down", "-v", "--remove-orphans", check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results, indent=2))
    return 0 if results.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
