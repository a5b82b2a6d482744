"""The model's calibration as exported (folded bias + temperature) and the bootstrap CIs of `model evaluate`;
the maths itself (Platt, thresholds, ECE, Brier) is tested in tests/unit/test_core_calibration.py."""

from __future__ import annotations

import numpy as np

from services.core.calibration import sigmoid
from services.inference.tools.evaluation import bootstrap_ci, calibrate


def test_folded_bias_and_temperature_equal_platt() -> None:
    """What export does: logit' = logit + b/a, T = 1/a; then sigmoid(logit'/T) == sigmoid(a*logit + b)."""
    a, b = 0.37, 1.3
    logits = np.linspace(-8, 8, 101)
    metadata = {"calibration": {"method": "temperature", "temperature": 1 / a}}
    np.testing.assert_allclose(calibrate(logits + b / a, metadata), sigmoid(a * logits + b), rtol=1e-12)


def test_bootstrap_ci_contains_the_estimate_and_narrows_with_data() -> None:
    rng = np.random.default_rng(3)

    def width(n: int) -> float:
        labels = (rng.random(n) < 0.6).astype(int)
        probs = np.clip(labels * 0.3 + rng.random(n) * 0.7, 0, 1)
        ci = bootstrap_ci(labels, probs, [str(i) for i in range(n)], {"operating": 0.5}, n=200)
        lo, hi = ci["auc"]
        assert lo <= hi
        return hi - lo

    assert width(2000) < width(100)
