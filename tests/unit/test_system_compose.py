"""docker-compose.yml, the Dockerfile, Prometheus and Grafana files, checked against the code
(no Docker engine here): every service, env var, port, command and metric they name exists."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from harness.system_config_refs import (
    REPO,
    SERVICES,
    cli_commands,
    env_var_names,
    metric_names,
    settings_default,
)

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text())
PROMETHEUS = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
DASHBOARD_DIR = REPO / "deploy/grafana/dashboards"
HTTP_PORT = {"ingest": 8001, "inference": 8002, "labeling": 8003, "aggregator": 8004}
_PORT_ENV = {svc: f"PT_{svc.upper()}_HTTP_PORT" for svc in SERVICES}


def pt_services() -> list[str]:
    return [s for s in SERVICES if s in COMPOSE["services"]]


def test_compose_has_the_whole_system() -> None:
    services = COMPOSE["services"]
    for name in ("rabbitmq", "postgres", "triton", *SERVICES, "prometheus", "grafana"):
        assert name in services, name
    assert "images" in COMPOSE["volumes"]
    for name, svc in services.items():
        assert svc.get("restart") in ("unless-stopped", "always", "on-failure"), f"{name}: restart policy"
        if name != "grafana" or "healthcheck" in svc:
            assert "healthcheck" in svc and svc["healthcheck"]["test"], f"{name}: health check"
    # the model repository mounted into Triton is the one the inference engineer ships
    mounts = services["triton"]["volumes"]
    assert any(m.startswith("./deploy/triton/model_repository:/models") for m in mounts)
    # GPU: the NGC image (onnxruntime backend) through deploy/docker/compose.gpu.yml
    gpu = yaml.safe_load((REPO / "deploy/docker/compose.gpu.yml").read_text())["services"]["triton"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert gpu["build"]["args"]["BASE_IMAGE"].startswith("nvcr.io/nvidia/tritonserver:")
    assert (REPO / gpu["build"]["context"] / gpu["build"]["dockerfile"]).is_file()
    assert "--model-repository=/models" in gpu["command"]


# compose service -> (Dockerfile, what it installs or runs): built from Debian / PyPI, no registry image
BUILT_IMAGES = {
    "rabbitmq": ("deploy/docker/rabbitmq.Dockerfile", "rabbitmq-server"),
    "postgres": ("deploy/docker/postgres.Dockerfile", "postgresql-15"),
    "prometheus": ("deploy/docker/prometheus.Dockerfile", "prometheus"),
    "triton": ("deploy/docker/triton-cpu.Dockerfile", "nvidia-pytriton=="),
}


@pytest.mark.parametrize("service", [*BUILT_IMAGES, *SERVICES])
def test_every_image_is_built_from_a_base_build_argument(service: str) -> None:
    """Each image but Grafana is built here FROM ${BASE_IMAGE} (deploy/docker/base-image.sh or public)."""
    svc = COMPOSE["services"][service]
    build = svc["build"]
    dockerfile = REPO / build["context"] / build["dockerfile"]
    assert dockerfile.is_file()
    if service in BUILT_IMAGES:
        assert dockerfile == REPO / BUILT_IMAGES[service][0]
        assert BUILT_IMAGES[service][1] in dockerfile.read_text()
    assert build["args"]["BASE_IMAGE"].startswith("${PT_BASE_IMAGE:-"), "the base is a build argument"
    assert svc["image"].startswith("pneumotriage"), "a local tag, never a registry image to pull"
    instructions = _dockerfile_instructions(dockerfile)
    assert all(rest.startswith("${BASE_IMAGE}") for op, rest in instructions if op == "FROM")
    assert any(op == "ARG" and rest.startswith("BASE_IMAGE=") for op, rest in instructions)
    assert any(op == "HEALTHCHECK" for op, _ in instructions) or "healthcheck" in svc
    # every COPY source exists in the build context
    context = REPO / build["context"]
    for op, rest in instructions:
        if op == "COPY" and "--from=" not in rest:
            *sources, _dest = rest.split()
            for src in sources:
                assert (context / src).exists(), f"{dockerfile.name}: COPY {src}"


def test_rabbitmq_image_has_the_plugins_prometheus_scrapes() -> None:
    text = (REPO / "deploy/docker/rabbitmq.Dockerfile").read_text()
    assert "rabbitmq_management" in text and "rabbitmq_prometheus" in text and "15692" in text
    env = COMPOSE["services"]["rabbitmq"]["environment"]
    assert env["RABBITMQ_DEFAULT_USER"] == "pneumotriage" and ":?" in env["RABBITMQ_DEFAULT_PASS"]


def test_compose_file_suits_compose_v1_and_v2() -> None:
    """Debian ships docker-compose 1.29 (v1): no top-level `name:`; secrets stay required (`:?`)."""
    assert "name" not in COMPOSE and "version" not in COMPOSE
    assert "COMPOSE_PROJECT_NAME=pneumotriage" in (REPO / ".env.example").read_text()
    text = (REPO / "docker-compose.yml").read_text()
    for secret in ("PT_SECRET_KEY", "PT_RABBITMQ_PASSWORD", "PT_POSTGRES_PASSWORD", "PT_GRAFANA_PASSWORD"):
        uses = re.findall(r"\$\{" + secret + r"([^}]*)\}", text)
        assert uses and all(u.startswith(":?") for u in uses), f"{secret}: no default"
    assert COMPOSE["services"]["grafana"]["profiles"] == ["grafana"]
    assert "deploy/docker/triton-cpu.py" in (REPO / ".dockerignore").read_text(), "classic builder's context"


def test_labeling_yields_the_cpu_to_the_triage_path() -> None:
    """Between containers a process's nice does not count; the CPU weight does (docs/performance.md)."""
    services = COMPOSE["services"]
    assert services["labeling"]["cpu_shares"] < 1024
    assert all("cpu_shares" not in services[name] for name in ("ingest", "inference", "aggregator"))
    k8s = {name: yaml.safe_load_all((REPO / f"deploy/k8s/{name}.yaml").read_text()) for name in SERVICES}

    def cpu_request(docs: object) -> float:
        for doc in docs:  # type: ignore[attr-defined]
            if doc and doc.get("kind") == "Deployment":
                value = doc["spec"]["template"]["spec"]["containers"][0]["resources"]["requests"]["cpu"]
                return float(value[:-1]) / 1000 if str(value).endswith("m") else float(value)
        raise AssertionError("no Deployment")

    requests = {name: cpu_request(docs) for name, docs in k8s.items()}
    assert requests["labeling"] < min(requests[n] for n in ("ingest", "inference", "aggregator")), requests


@pytest.mark.parametrize("service", SERVICES)
def test_service_container_matches_the_code(service: str) -> None:
    svc = COMPOSE["services"][service]
    assert svc["build"]["dockerfile"] == "deploy/docker/Dockerfile"
    assert (REPO / svc["build"]["context"] / svc["build"]["dockerfile"]).is_file()
    assert svc["command"] == [service]
    assert any(v.startswith("images:") for v in svc["volumes"]), "shared image store volume"
    env = svc["environment"]
    assert env["PT_DATA_DIR"] == "/var/lib/pneumotriage"
    assert env["PT_DATABASE_URL"].startswith("postgresql+asyncpg://") and "@postgres:5432/" in env["PT_DATABASE_URL"]
    assert "@rabbitmq:5672/" in env["PT_AMQP_URL"]
    assert env["PT_QUORUM_QUEUES"] == "true", "the settings `up --cluster` and the replica tests prove"
    port = HTTP_PORT[service]
    assert env[_PORT_ENV[service]] == str(port)
    assert f"http://127.0.0.1:{port}/healthz" in svc["healthcheck"]["test"]
    published = [str(p) for p in svc.get("ports", [])] + [str(p) for p in svc.get("expose", [])]
    assert any(p == str(port) or p.endswith(f":{port}") for p in published)
    assert service in cli_commands(), f"`pneumotriage {service}` does not exist"
    names = env_var_names()
    unknown = sorted(k for k in env if k.startswith("PT_") and k not in names)
    assert not unknown, f"compose sets env vars no settings class reads: {unknown}"
    assert settings_default(_PORT_ENV[service]) == port, "compose port differs from the code's default"


def test_ingest_dicom_port_and_ae() -> None:
    svc = COMPOSE["services"]["ingest"]
    assert "11112:11112" in svc["ports"]
    assert svc["environment"]["PT_INGEST_PORT"] == "11112"
    assert svc["environment"]["PT_INGEST_AE_TITLE"] == "PNEUMOTRIAGE"
    assert settings_default("PT_INGEST_PORT") == 11112
    assert settings_default("PT_INGEST_AE_TITLE") == "PNEUMOTRIAGE"


def test_prometheus_scrapes_every_service_on_its_port() -> None:
    jobs = {job["job_name"]: job for job in PROMETHEUS["scrape_configs"]}
    for service in SERVICES:
        sd = jobs[service]["dns_sd_configs"][0]
        assert sd["names"] == [service] and sd["port"] == HTTP_PORT[service]
        assert jobs[service].get("metrics_path", "/metrics") == "/metrics"
    assert jobs["rabbitmq"]["static_configs"][0]["targets"] == ["rabbitmq:15692"]
    assert jobs["triton"]["static_configs"][0]["targets"] == ["triton:8002"]
    # every scraped host is a compose service
    for job in PROMETHEUS["scrape_configs"]:
        for sc in job.get("static_configs", []):
            for target in sc["targets"]:
                assert target.split(":")[0] in COMPOSE["services"]


def test_grafana_dashboard_uses_real_metrics() -> None:
    dashboards = list(DASHBOARD_DIR.glob("*.json"))
    assert dashboards
    known = metric_names()
    provisioned = yaml.safe_load((REPO / "deploy/grafana/provisioning/datasources/prometheus.yml").read_text())
    ds_uid = provisioned["datasources"][0]["uid"]
    assert provisioned["datasources"][0]["url"] == "http://prometheus:9090"
    for path in dashboards:
        dash = json.loads(path.read_text())
        assert dash["uid"] and dash["panels"]
        used: set[str] = set()
        for panel in dash["panels"]:
            if panel["type"] == "row":
                continue
            assert panel["datasource"]["uid"] == ds_uid
            for target in panel["targets"]:
                used.update(re.findall(r"\b(pt_[a-z0-9_]+)", target["expr"]))
        assert "pt_aggregator_time_to_first_flag_seconds_bucket" in used, "end-to-end latency panel"
        for service in SERVICES:  # every service has at least one panel of its own
            assert any(name.startswith(f"pt_{service}_") for name in used), service
        ids = [panel["id"] for panel in dash["panels"]]
        assert len(ids) == len(set(ids))
        missing = sorted(used - known)
        assert not missing, f"{path.name} plots metrics no service defines: {missing}"


def _dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", path.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_dockerfile_is_sane() -> None:
    path = REPO / "deploy/docker/Dockerfile"
    instructions = _dockerfile_instructions(path)
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    args = dict(rest.split("=", 1) for op, rest in instructions if op == "ARG" and "=" in rest)
    # the Python in the image is the one the project requires
    assert args["PYTHON_VERSION"] == "3.11" and ">=3.11,<3.12" in pyproject["project"]["requires-python"]
    froms = [rest for op, rest in instructions if op == "FROM"]
    assert all(f.startswith("${BASE_IMAGE}") for f in froms)
    assert args["BASE_IMAGE"] == "python:${PYTHON_VERSION}-slim-bookworm", "the public image stays the default"
    # every COPY source exists in the repository and survives the .dockerignore
    ignore = (REPO / "deploy/docker/Dockerfile.dockerignore").read_text().splitlines()
    allowed = [line[1:].rstrip("*").rstrip("/") for line in ignore if line.startswith("!")]
    for op, rest in instructions:
        if op == "COPY" and "--from=" not in rest:
            *sources, _dest = rest.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: not in the repository"
                assert any(src.rstrip("/").startswith(a) for a in allowed), f"COPY {src}: excluded by dockerignore"
    assert "tests" not in " ".join(allowed) and ".venv" not in " ".join(allowed)
    # runs as a non-root user, the console script is the entry point, the ports are exposed
    users = [rest for op, rest in instructions if op == "USER"]
    assert users and users[-1] not in ("root", "0")
    entry = json.loads(next(rest for op, rest in instructions if op == "ENTRYPOINT"))
    assert entry == list(pyproject["project"]["scripts"])
    exposed = {int(p) for op, rest in instructions if op == "EXPOSE" for p in rest.split()}
    assert exposed >= {11112, *HTTP_PORT.values()}
    env_line = " ".join(rest for op, rest in instructions if op == "ENV")
    assert "PT_DATA_DIR=/var/lib/pneumotriage" in env_line and "PT_HTTP_HOST=0.0.0.0" in env_line
    env_names = re.findall(r"\b(PT_[A-Z0-9_]+)=", env_line)
    unknown = [n for n in env_names if n not in env_var_names()]
    assert not unknown, f"the image sets env vars no settings class reads: {unknown}"
    # the serving image does not pull the training extra (PyTorch)
    assert not any("[train]" in rest for op, rest in instructions if op == "RUN")


def test_healthcheck_script_reports_health(tmp_path: Path) -> None:
    """The container health check script against a real HTTP server: 200 -> 0, 503 -> 1, down -> 1."""
    import subprocess
    import sys
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    status = {"code": 200}

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"] if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/healthz"
    script = str(REPO / "deploy/docker/healthcheck.py")
    try:
        assert subprocess.run([sys.executable, script, url], timeout=30).returncode == 0
        status["code"] = 503
        assert subprocess.run([sys.executable, script, url], capture_output=True, timeout=30).returncode == 1
    finally:
        server.shutdown()
        server.server_close()
    assert subprocess.run([sys.executable, script, url], capture_output=True, timeout=30).returncode == 1


def _exposed(dockerfile: str) -> set[int]:
    return {int(p) for op, rest in _dockerfile_instructions(REPO / dockerfile) if op == "EXPOSE" for p in rest.split()}


def test_built_images_agree_with_prometheus_and_kubernetes() -> None:
    """The images compose builds expose what Prometheus scrapes; the GPU Triton in compose is the one
    Kubernetes runs (same NGC image, same arguments, same ports as the CPU build)."""
    assert 15692 in _exposed("deploy/docker/rabbitmq.Dockerfile")
    assert {8000, 8001, 8002} <= _exposed("deploy/docker/triton-cpu.Dockerfile")
    assert 9090 in _exposed("deploy/docker/prometheus.Dockerfile")
    assert 5432 in _exposed("deploy/docker/postgres.Dockerfile")
    assert COMPOSE["services"]["inference"]["environment"]["PT_INFERENCE_TRITON_URL"] == "triton:8001"
    k8s_triton = next(
        doc
        for doc in yaml.safe_load_all((REPO / "deploy/k8s/triton.yaml").read_text())
        if doc and doc["kind"] == "Deployment"
    )
    container = next(c for c in k8s_triton["spec"]["template"]["spec"]["containers"] if c["name"] == "triton")
    gpu = yaml.safe_load((REPO / "deploy/docker/compose.gpu.yml").read_text())["services"]["triton"]
    assert container["image"] == gpu["build"]["args"]["BASE_IMAGE"], "compose GPU and k8s run the same Triton"
    assert container["args"] == gpu["command"]
    assert {p["containerPort"] for p in container["ports"]} <= _exposed("deploy/docker/triton-cpu.Dockerfile")
    # k8s copies the model repository out of the PneumoTriage image: the path its Dockerfile fills
    init = k8s_triton["spec"]["template"]["spec"]["initContainers"][0]
    dockerfile = (REPO / "deploy/docker/Dockerfile").read_text()
    assert "COPY deploy/triton /opt/pneumotriage/triton" in dockerfile
    assert "/opt/pneumotriage/triton/model_repository/." in init["command"]
    # the CPU Triton serves the repository compose mounts, read-only, where triton-cpu.py looks
    assert "./deploy/triton/model_repository:/models:ro" in COMPOSE["services"]["triton"]["volumes"]
    assert '"PT_TRITON_MODEL_REPOSITORY", "/models"' in (REPO / "deploy/docker/triton-cpu.py").read_text()
