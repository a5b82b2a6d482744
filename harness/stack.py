"""What runs on one machine: the four services with their environment and health URLs.

Shared by `./pt up` and the test harness so both start the services the same way.
Each service reads its own port variables; the names are kept here in one table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from harness.processes import DEFAULT_HTTP_PORTS, SERVICES, ServiceSpec, service_argv

# Environment variable that sets each service's HTTP port (/healthz, /metrics, web).
HTTP_PORT_ENV: dict[str, str] = {svc: f"PT_{svc.upper()}_HTTP_PORT" for svc in SERVICES}
DICOM_PORT_ENV = "PT_INGEST_PORT"
AE_TITLE_ENV = "PT_INGEST_AE_TITLE"
DEFAULT_DICOM_PORT = 11112
DEFAULT_AE_TITLE = "PNEUMOTRIAGE"


@dataclass
class StackConfig:
    data_dir: Path
    amqp_url: str
    host: str = "127.0.0.1"
    http_ports: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_HTTP_PORTS))
    dicom_port: int = DEFAULT_DICOM_PORT
    ae_title: str = DEFAULT_AE_TITLE
    # Extra environment for every service, and per service.
    env: dict[str, str] = field(default_factory=dict)
    service_env: dict[str, dict[str, str]] = field(default_factory=dict)
    services: tuple[str, ...] = SERVICES
    # Replicas per service (default 1). Replica 1 keeps the service's name and ports; replica k > 1
    # is named "<service>-k" and takes its HTTP port from replica_http_ports[service][k - 2] (and,
    # for ingest, its DICOM port from replica_dicom_ports[k - 2]: several ingest processes listen
    # on several ports under one AE title; a load balancer or the sender spreads associations).
    replicas: dict[str, int] = field(default_factory=dict)
    replica_http_ports: dict[str, list[int]] = field(default_factory=dict)
    replica_dicom_ports: list[int] = field(default_factory=list)
    # Broker nodes of a cluster: replica k (1..) of the i-th service uses amqp_urls[(i + k - 1) % n]
    # (spread over the nodes; a client reconnects to its node when that node comes back).
    amqp_urls: list[str] = field(default_factory=list)

    def replica_names(self, service: str) -> list[str]:
        return [service] + [f"{service}-{k}" for k in range(2, self.replicas.get(service, 1) + 1)]

    @property
    def dicom_ports(self) -> list[int]:
        """Every ingest replica's DICOM port (the first is `dicom_port`)."""
        n = self.replicas.get("ingest", 1) if "ingest" in self.services else 1
        return [self.dicom_port, *self.replica_dicom_ports[: n - 1]]

    def replica_url(self, name: str, path: str = "") -> str:
        """URL of a replica by its name ("aggregator", "aggregator-2", ...)."""
        service, _, k = name.partition("-")
        port = self.http_ports[service] if not k else self.replica_http_ports[service][int(k) - 2]
        return f"http://{self.host}:{port}{path}"

    def url(self, service: str, path: str = "") -> str:
        return f"http://{self.host}:{self.http_ports[service]}{path}"

    def common_env(self) -> dict[str, str]:
        env = {
            "PT_DATA_DIR": str(self.data_dir),
            "PT_AMQP_URL": self.amqp_url,
            "PT_HTTP_HOST": self.host,
            DICOM_PORT_ENV: str(self.dicom_port),
            AE_TITLE_ENV: self.ae_title,
        }
        # Every service gets every port: the ingest needs none of the others today, but a web
        # app linking to another one (worklist -> labeling) can then build the URL.
        env.update({HTTP_PORT_ENV[svc]: str(port) for svc, port in self.http_ports.items()})
        env.update(self.env)
        return env

    def specs(self) -> list[ServiceSpec]:
        common = self.common_env()
        out: list[ServiceSpec] = []
        for i, svc in enumerate(self.services):
            for k, name in enumerate(self.replica_names(svc), start=1):
                env = {**common, **self.service_env.get(svc, {})}
                if k > 1:
                    env[HTTP_PORT_ENV[svc]] = str(self.replica_http_ports[svc][k - 2])
                    if svc == "ingest":
                        env[DICOM_PORT_ENV] = str(self.replica_dicom_ports[k - 2])
                if self.amqp_urls:
                    env["PT_AMQP_URL"] = self.amqp_urls[(i + k - 1) % len(self.amqp_urls)]
                out.append(
                    ServiceSpec(
                        name=name, argv=service_argv(svc), env=env, health_url=self.replica_url(name, "/healthz")
                    )
                )
        return out
