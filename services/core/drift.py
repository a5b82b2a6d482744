"""Score-distribution drift: the reference a model version ships with, and the statistics that
compare a live window of predictions with it.

The reference (``drift_reference.json`` in the model version's directory, written by
``pneumotriage model drift-reference``) summarises the model's raw logits on its validation split:
101 quantiles, 10 equal-frequency bin edges (for the population stability index) and the
predicted-positive rate (calibrated P >= 0.5). Raw logits, not probabilities: a site
recalibration changes the probabilities, not what the network sees.

Written by the inference side, read by the aggregator: the format lives here, in the shared kernel.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE_FILE = "drift_reference.json"
PSI_BINS = 10
POSITIVE_P = 0.5


@dataclass(frozen=True)
class DriftReference:
    model_name: str
    model_version: str
    n: int
    quantiles: np.ndarray  # 101 logit quantiles (0, 1, ..., 100 %)
    edges: np.ndarray  # PSI_BINS - 1 inner bin edges (equal-frequency on the reference)
    positive_rate: float
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {
            "model_name": self.model_name,
            "model_version": self.model_version,
            "n": self.n,
            "source": self.source,
            "positive_p": POSITIVE_P,
            "positive_rate": round(self.positive_rate, 6),
            "logit_quantiles": [round(float(v), 5) for v in self.quantiles],
            "psi_edges": [round(float(v), 5) for v in self.edges],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DriftReference:
        return cls(
            model_name=str(d["model_name"]),
            model_version=str(d["model_version"]),
            n=int(d["n"]),
            quantiles=np.asarray(d["logit_quantiles"], dtype=np.float64),
            edges=np.asarray(d["psi_edges"], dtype=np.float64),
            positive_rate=float(d["positive_rate"]),
            source=str(d.get("source", "")),
        )

    @classmethod
    def load(cls, path: Path) -> DriftReference:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def build_reference(
    logits: np.ndarray, probabilities: np.ndarray, model_name: str, model_version: str, source: str
) -> DriftReference:
    x = np.asarray(logits, dtype=np.float64)
    if x.size < 50:
        raise ValueError(f"a drift reference needs at least 50 predictions, got {x.size}")
    edges = np.quantile(x, np.linspace(0, 1, PSI_BINS + 1)[1:-1])
    return DriftReference(
        model_name=model_name,
        model_version=model_version,
        n=int(x.size),
        quantiles=np.quantile(x, np.linspace(0, 1, 101)),
        edges=edges,
        positive_rate=float((np.asarray(probabilities) >= POSITIVE_P).mean()),
        source=source,
    )


def psi(reference: DriftReference, logits: np.ndarray, eps: float = 1e-4) -> float:
    """Population stability index of the window against the reference's equal-frequency bins
    (< 0.1 stable, 0.1-0.25 moderate shift, > 0.25 significant shift)."""
    x = np.asarray(logits, dtype=np.float64)
    if x.size == 0:
        return 0.0
    counts = np.bincount(np.searchsorted(reference.edges, x, side="right"), minlength=PSI_BINS)
    actual = np.maximum(counts / x.size, eps)
    expected = np.full(PSI_BINS, 1.0 / PSI_BINS)
    return float(((actual - expected) * np.log(actual / expected)).sum())


def reference_cdf(reference: DriftReference, x: np.ndarray) -> np.ndarray:
    q = reference.quantiles
    levels = np.linspace(0, 1, q.size)
    # np.interp needs increasing x: ties in the quantiles keep the highest level
    uq, idx = np.unique(q, return_index=True)
    last = np.searchsorted(q, uq, side="right") - 1
    return np.interp(x, uq, levels[last], left=0.0, right=1.0) if idx.size else np.zeros_like(x)


def ks(reference: DriftReference, logits: np.ndarray) -> tuple[float, float]:
    """Kolmogorov-Smirnov distance between the window and the reference, and its asymptotic
    two-sample p-value (reference size from the reference file)."""
    x = np.sort(np.asarray(logits, dtype=np.float64))
    n = x.size
    if n == 0:
        return 0.0, 1.0
    ref = reference_cdf(reference, x)
    emp_hi = np.arange(1, n + 1) / n
    emp_lo = np.arange(0, n) / n
    d = float(max(np.max(np.abs(emp_hi - ref)), np.max(np.abs(ref - emp_lo))))
    m = reference.n
    en = math.sqrt(n * m / (n + m))
    lam = (en + 0.12 + 0.11 / en) * d
    p = 2.0 * sum((-1) ** (k - 1) * math.exp(-2.0 * k * k * lam * lam) for k in range(1, 101))
    return d, float(min(max(p, 0.0), 1.0))
