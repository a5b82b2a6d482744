"""deploy/prometheus/alerts.yml: loaded by prometheus.yml and mounted by docker-compose, and every
metric a rule names exists in the aggregator's Prometheus registry with the labels the rule uses
(a renamed metric would leave an alert that can never fire)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import services.aggregator.service  # noqa: F401  (registers the aggregator's metrics)
from services.aggregator.sr_delivery import REASONS
from services.ingest import app as _ingest_app  # noqa: F401  (the ingest image store's free space)

REPO = Path(__file__).resolve().parents[2]
RULES = yaml.safe_load((REPO / "deploy/prometheus/alerts.yml").read_text())
# Rules on what other exporters publish (Prometheus itself, RabbitMQ's rabbitmq_prometheus plugin).
FOREIGN = {"PneumoTriageBrokerDown": {"up"}, "PneumoTriageDeadLetters": {"rabbitmq_detailed_queue_messages"}}
# Issue 25: the alerts an operator of the compose / k8s stack needs.
REQUIRED = {"PneumoTriageBrokerDown", "PneumoTriageDeadLetters", "PneumoTriageModelDrift", "PneumoTriageSRBacklog",
            "PneumoTriageOutboxGrowing", "PneumoTriageImageStoreNearlyFull", "PneumoTriageSRDeliveryStuck"}  # fmt: skip


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
    assert {r["alert"] for r in rules} >= REQUIRED
    for rule in rules:
        names = set(re.findall(r"\b(pt_[a-z_]+)\b", rule["expr"]))
        if rule["alert"] in FOREIGN:
            assert not names and all(n in rule["expr"] for n in FOREIGN[rule["alert"]]), rule["alert"]
            assert rule["labels"]["severity"] in {"page", "ticket"} and rule["annotations"]["summary"]
            continue
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


def test_dead_letter_rule_matches_the_broker_queue_names() -> None:
    from services.core.broker import CONSUMERS

    rule = next(r for g in RULES["groups"] for r in g["rules"] if r["alert"] == "PneumoTriageDeadLetters")
    pattern = re.search(r'queue=~"([^"]+)"', rule["expr"]).group(1).replace("\\\\", "\\")  # type: ignore[union-attr]
    dlqs = [spec.dlq for spec in CONSUMERS.values()] if isinstance(CONSUMERS, dict) else [s.dlq for s in CONSUMERS]
    assert dlqs and all(re.fullmatch(pattern, q) for q in dlqs)
    assert not any(re.fullmatch(pattern, q.removesuffix(".dlq")) for q in dlqs)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool (Debian prometheus, installed by ./pt test)")
def test_promtool_checks_and_unit_tests_the_rules() -> None:
    """promtool check rules + config, and the unit tests in deploy/prometheus/alerts.test.yml (each alert fires
    on its fault and stays quiet otherwise)."""
    prom = REPO / "deploy/prometheus"
    for args in (["check", "rules", "alerts.yml"], ["test", "rules", "alerts.test.yml"]):
        res = subprocess.run(["promtool", *args], cwd=prom, capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stdout + res.stderr
    tested = set(re.findall(r"alertname: (\w+)", (prom / "alerts.test.yml").read_text()))
    assert tested >= {r["alert"] for g in RULES["groups"] for r in g["rules"]}, "every alert has a promtool test"
