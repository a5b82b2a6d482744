"""deploy/prometheus/alerts.yml: loaded by prometheus.yml and mounted by docker-compose, and every
metric a rule names exists in the aggregator's Prometheus registry with the labels the rule uses
(a renamed metric would leave an alert that can never fire)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

import services.aggregator.service  # noqa: F401  (registers the aggregator's metrics)
from services.aggregator.sr_delivery import REASONS

REPO = Path(__file__).resolve().parents[2]
RULES = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())


def families() -> dict[str, set[str]]:
    """Metric family name -> label names, for every sample name the registry can expose."""
    out: dict[str, set[str]] = {}
    for collector in list(REGISTRY._collector_to_names):
        for fam in collector.describe() if hasattr(collector, "describe") else []:
            labels = set(getattr(collector, "_labelnames", ()))
            for suffix in ("", "_total"):
                out[fam.name + suffix] = labels
    return out


def test_rules_are_loaded_and_mounted() -> None:
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text())
    assert "alerts.yml" in config["rule_files"]
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = compose["services"]["prometheus"]["volumes"]
    assert "./deploy/prometheus/alerts.yml:/etc/prometheus/alerts.yml:ro" in mounts


def test_every_rule_names_existing_metrics_and_labels() -> None:
    known = families()
    rules = [rule for group in RULES["groups"] for rule in group["rules"]]
    assert {r["alert"] for r in rules} >= {"PneumoTriageSRDeliveryStuck", "PneumoTriageSRDestinationRejecting"}
    for rule in rules:
        names = set(re.findall(r"\b(pt_[a-z_]+)\b", rule["expr"]))
        assert names, rule["alert"]
        for name in names:
            assert name in known, f"{rule['alert']}: no metric {name}"
        for label, value in re.findall(r'(\w+)="([^"]*)"', rule["expr"]):
            name = next(n for n in names)
            assert label in known[name], f"{rule['alert']}: {name} has no label {label}"
            if label == "reason":
                assert value in REASONS
        for label in re.findall(r"by \(([^)]*)\)", rule["expr"]):
            for part in label.split(","):
                assert all(part.strip() in known[n] for n in names), f"{rule['alert']}: by {part}"
        assert rule["labels"]["severity"] in {"page", "ticket"}
        assert rule["annotations"]["summary"]
