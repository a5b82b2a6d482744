"""Calibration fit, operating thresholds and the evaluation metrics on data with known answers."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss

from services.inference.tools.evaluation import (
    bootstrap_ci,
    brier,
    calibrate,
    expected_calibration_error,
    threshold_metrics,
)
from services.inference.tools.training.calibrate import choose_thresholds, fit_platt, sigmoid


def test_platt_fit_recovers_the_generating_parameters() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, 20000)
    labels = rng.random(20000) < sigmoid(0.5 * logits - 1.0)
    a, b = fit_platt(logits, labels)
    assert a == pytest.approx(0.5, abs=0.03)
    assert b == pytest.approx(-1.0, abs=0.06)


def test_folded_bias_and_temperature_equal_platt() -> None:
    """What export does: logit' = logit + b/a, T = 1/a; then sigmoid(logit'/T) == sigmoid(a*logit + b)."""
    a, b = 0.37, 1.3
    logits = np.linspace(-8, 8, 101)
    metadata = {"calibration": {"method": "temperature", "temperature": 1 / a}}
    np.testing.assert_allclose(calibrate(logits + b / a, metadata), sigmoid(a * logits + b), rtol=1e-12)


def test_thresholds_meet_their_operating_points() -> None:
    rng = np.random.default_rng(1)
    labels = rng.random(4000) < 0.7
    probs = np.clip(np.where(labels, rng.beta(5, 2, 4000), rng.beta(2, 5, 4000)), 0, 1)
    t = choose_thresholds(probs, labels, rule_out_sensitivity=0.95, urgent_specificity=0.95)
    assert t["rule_out"] <= t["operating"] <= t["urgent"]
    assert threshold_metrics(labels, probs, t["rule_out"])["sensitivity"] >= 0.95
    assert threshold_metrics(labels, probs, t["urgent"])["specificity"] >= 0.95


def test_threshold_metrics_on_a_hand_counted_case() -> None:
    labels = np.array([1, 1, 1, 0, 0])
    probs = np.array([0.9, 0.6, 0.2, 0.7, 0.1])
    m = threshold_metrics(labels, probs, 0.5)  # tp=2 fn=1 fp=1 tn=1
    assert m == pytest.approx(
        {"accuracy": 3 / 5, "sensitivity": 2 / 3, "specificity": 1 / 2, "ppv": 2 / 3, "npv": 1 / 2, "f1": 2 / 3}
    )


def test_ece_and_brier() -> None:
    rng = np.random.default_rng(2)
    probs = rng.random(50000)
    labels = rng.random(50000) < probs  # perfectly calibrated
    assert expected_calibration_error(labels, probs) < 0.01
    assert expected_calibration_error(labels, np.clip(probs + 0.2, 0, 1)) > 0.1
    assert brier(labels, probs) == pytest.approx(brier_score_loss(labels, probs))


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
