"""services/core/calibration.py: the one implementation of the calibration maths."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import brier_score_loss
from sklearn.metrics import log_loss as sk_log_loss

from services.core.calibration import (
    brier,
    choose_thresholds,
    expected_calibration_error,
    fit_platt,
    log_loss,
    logit,
    platt,
    reliability_bins,
    sigmoid,
    specificity_at_sensitivity,
    temperature,
    threshold_for_sensitivity,
    threshold_metrics,
)
from services.core.sensitivity_bound import allowed_misses


def test_sigmoid_and_logit() -> None:
    z = np.array([-800.0, -30.0, -1.0, 0.0, 1.0, 30.0, 800.0])
    p = sigmoid(z)
    assert isinstance(p, np.ndarray) and np.all(np.isfinite(p)) and p[3] == 0.5
    np.testing.assert_allclose(p[1:-1], 1 / (1 + np.exp(-z[1:-1])), rtol=0, atol=2e-16)  # absolute
    assert isinstance(sigmoid(2.0), float) and sigmoid(2.0) == pytest.approx(float(sigmoid(np.array([2.0]))[0]))
    assert sigmoid(-1e6) == 0.0 and sigmoid(1e6) == 1.0
    for x in (-5.0, -0.3, 0.0, 2.5):
        assert logit(sigmoid(x)) == pytest.approx(x, abs=1e-9)
    assert logit(0.0) == pytest.approx(math.log(1e-6 / (1 - 1e-6)))


def test_platt_recovers_known_parameters() -> None:
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2.5, 40000)
    labels = (rng.random(logits.size) < sigmoid(0.6 * logits - 0.8)).astype(int)
    a, b = fit_platt(logits, labels)
    assert a == pytest.approx(0.6, abs=0.03) and b == pytest.approx(-0.8, abs=0.05)
    np.testing.assert_allclose(platt(logits, a, b), sigmoid(a * logits + b))
    # the temperature form the model's metadata stores: logit' = logit + b/a, T = 1/a
    np.testing.assert_allclose(temperature(logits + b / a, 1 / a), platt(logits, a, b), rtol=1e-12)


def test_platt_on_separable_labels_stays_finite() -> None:
    logits = np.array([-3.0, -2.0, -1.0, 1.0, 2.0, 3.0])
    a, b = fit_platt(logits, logits > 0)
    assert math.isfinite(a) and math.isfinite(b) and a > 0


def test_scores_match_sklearn() -> None:
    rng = np.random.default_rng(1)
    probs = rng.random(5000)
    labels = (rng.random(5000) < probs).astype(int)
    assert brier(labels, probs) == pytest.approx(brier_score_loss(labels, probs))
    assert log_loss(probs, labels) == pytest.approx(sk_log_loss(labels, probs))


def test_ece_of_a_calibrated_sample_is_about_zero() -> None:
    rng = np.random.default_rng(2)
    probs = rng.random(200000)
    labels = rng.random(probs.size) < probs
    assert expected_calibration_error(labels, probs) < 0.005
    assert expected_calibration_error(labels, np.clip(probs + 0.2, 0, 1)) > 0.15
    bins = reliability_bins(labels, probs)
    assert len(bins) == 10 and sum(n for *_, n in bins) == probs.size
    for mean_p, observed, _ in bins:
        assert abs(mean_p - observed) < 0.01
    # p = 1.0 lands in the last bin, not an eleventh
    assert reliability_bins([1, 0], [1.0, 0.0]) == [(0.0, 0.0, 1), (1.0, 1.0, 1)]


def test_threshold_for_sensitivity_meets_its_target() -> None:
    rng = np.random.default_rng(4)
    labels = rng.random(3000) < 0.4
    probs = np.clip(rng.normal(np.where(labels, 0.7, 0.3), 0.2), 0, 1)
    for target in (0.8, 0.9, 0.95, 0.99):
        t = threshold_for_sensitivity(labels, probs, target)
        assert threshold_metrics(labels, probs, t)["sensitivity"] >= target
        higher = np.sort(probs[labels])[np.sort(probs[labels]) > t]
        if higher.size:  # the highest such threshold: the next pneumonia score up misses the target
            assert threshold_metrics(labels, probs, higher[0])["sensitivity"] < target
    # with a confidence: at most allowed_misses pneumonias below it, so never above the plain one
    pos = np.sort(probs[labels])
    k = allowed_misses(pos.size, 0.95, 0.8)
    assert (
        threshold_for_sensitivity(labels, probs, 0.95, 0.8) == pos[k] <= threshold_for_sensitivity(labels, probs, 0.95)
    )
    assert threshold_for_sensitivity(np.ones(10), np.linspace(0, 1, 10), 0.95, 0.8) == 0.0  # too few: the lowest
    assert threshold_for_sensitivity(np.zeros(5), np.ones(5), 0.95) == 0.0
    assert threshold_for_sensitivity(labels, probs, 0.0) == pos[-1]


def test_specificity_at_sensitivity() -> None:
    labels = np.array([1, 1, 1, 1, 0, 0, 0, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.2, 0.1, 0.3, 0.75, 0.05])
    # 100 % sensitivity: cut at 0.2 -> healthy below it: 0.1, 0.05 -> 2/4
    assert specificity_at_sensitivity(labels, scores, 1.0) == 0.5
    # 75 %: cut at 0.7 -> 0.1, 0.3, 0.05 -> 3/4
    assert specificity_at_sensitivity(labels, scores, 0.75) == 0.75
    assert math.isnan(specificity_at_sensitivity(np.ones(3), scores[:3], 0.9))


def test_threshold_metrics_on_a_hand_counted_case() -> None:
    labels = np.array([1, 1, 1, 0, 0])
    probs = np.array([0.9, 0.6, 0.2, 0.7, 0.1])
    m = threshold_metrics(labels, probs, 0.5)  # tp=2 fn=1 fp=1 tn=1
    assert m == pytest.approx(
        {"accuracy": 3 / 5, "sensitivity": 2 / 3, "specificity": 1 / 2, "ppv": 2 / 3, "npv": 1 / 2, "f1": 2 / 3}
    )
    assert math.isnan(threshold_metrics([0, 0], [0.1, 0.2], 0.5)["sensitivity"])


def test_choose_thresholds_meets_its_targets_and_stays_ordered() -> None:
    rng = np.random.default_rng(5)
    labels = rng.random(4000) < 0.5
    probs = sigmoid(rng.normal(np.where(labels, 1.5, -1.5), 1.0))
    t = choose_thresholds(probs, labels, rule_out_sensitivity=0.95, urgent_specificity=0.95)
    assert t["rule_out"] <= t["operating"] <= t["urgent"]
    assert threshold_metrics(labels, probs, t["rule_out"])["sensitivity"] >= 0.95
    assert threshold_metrics(labels, probs, t["urgent"])["specificity"] >= 0.95
    # Youden's J: no candidate threshold does better
    j = lambda th: sum(threshold_metrics(labels, probs, th)[k] for k in ("sensitivity", "specificity")) - 1  # noqa: E731
    assert j(t["operating"]) >= max(j(x) for x in np.quantile(probs, np.linspace(0, 1, 101))) - 1e-12
    s = choose_thresholds(probs, labels, operating_sensitivity=0.98)
    assert threshold_metrics(labels, probs, s["operating"])["sensitivity"] >= 0.98
