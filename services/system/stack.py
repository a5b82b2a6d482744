"""What runs on one machine: the four services with their environment and health URLs.

Shared by `pneumotriage up` and the test harness so both start the services the same way.
Each service reads its own port variables; the names are kept here in one table.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.system.processes import DEFAULT_HTTP_PORTS, SERVICES, ServiceSpec, service_argv

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
        return [
            ServiceSpec(
                name=svc,
                argv=service_argv(svc),
                env={**common, **self.service_env.get(svc, {})},
                health_url=self.url(svc, "/healthz"),
            )
            for svc in self.services
        ]
