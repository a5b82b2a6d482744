"""Deployment files ship no usable secret: docker-compose.yml requires every password and the
session key (no `${VAR:-default}`), and what has no authentication is published on loopback only."""

from __future__ import annotations

import re

import yaml

from harness.system_config_refs import REPO

COMPOSE_TEXT = (REPO / "docker-compose.yml").read_text()
COMPOSE = yaml.safe_load(COMPOSE_TEXT)
SECRET_VAR = re.compile(r"\$\{(PT_[A-Z_]*(?:PASSWORD|SECRET)[A-Z_]*)(:?[-?=+])?([^}]*)\}")


def test_compose_requires_every_secret() -> None:
    uses = SECRET_VAR.findall(COMPOSE_TEXT)
    names = {name for name, _, _ in uses}
    assert {"PT_SECRET_KEY", "PT_RABBITMQ_PASSWORD", "PT_POSTGRES_PASSWORD", "PT_GRAFANA_PASSWORD"} <= names
    for name, op, _ in uses:
        assert op == ":?", f"{name} must be required (${{{name}:?...}}), not defaulted"
    example = (REPO / ".env.example").read_text()
    for name in names:
        assert re.search(rf"^{name}=", example, re.M), f"{name} missing from .env.example"


def test_unauthenticated_ports_are_published_on_loopback_only() -> None:
    services = COMPOSE["services"]
    for name in ("rabbitmq", "prometheus"):
        for mapping in services[name].get("ports", []):
            assert str(mapping).startswith("127.0.0.1:"), (name, mapping)
