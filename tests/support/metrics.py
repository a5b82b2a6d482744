"""Reading Prometheus counters from a service's /metrics text in tests."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families


def counter_total(metrics: str, family: str, **labels: str) -> float:
    """Sum of the `<family>_total` samples whose labels match (all of them when none are given)."""
    return sum(
        sample.value
        for fam in text_string_to_metric_families(metrics)
        if fam.name == family
        for sample in fam.samples
        if sample.name.endswith("_total") and all(sample.labels.get(k) == v for k, v in labels.items())
    )
