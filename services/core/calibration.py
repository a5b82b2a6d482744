"""Calibration maths, one implementation of each (numpy only; no service imports it the other way).

Used by training (Platt on the validation logits, the model's operating thresholds), evaluation and
the proxy-external report (ECE, Brier, reliability, metrics at a threshold), `model adapt` and the
site loop, the aggregator (fusion's sigmoid, a site's Platt recalibration, the policy report) and
the benches.

* probabilities: `sigmoid`, `logit`, `platt` (P = sigmoid(a * logit + b)), `temperature`
  (P = sigmoid(logit / T), the form a model version's metadata.json stores);
* fitting: `fit_platt` (Newton's method on the binary log-loss, a tiny ridge only to keep the
  Hessian invertible on separable data);
* scores: `log_loss`, `brier`, `reliability_bins`, `expected_calibration_error`;
* thresholds: `threshold_metrics` (sensitivity, specificity, PPV, ... at a threshold),
  `threshold_for_sensitivity` (the highest threshold keeping a sensitivity, optionally with a
  stated confidence on new images, services/core/sensitivity_bound.py), `specificity_at_sensitivity`
  (threshold-free), `choose_thresholds` (a model's rule-out / operating (Youden's J or a
  sensitivity target) / urgent points).

The aggregator's policy thresholds (`services/aggregator/tools/calibrate.py` `choose_thresholds`:
rule-out under the conflict rule, PPV-bounded URGENT / SUSPECTED bands on the fused posterior) are
a triage-policy rule, not a calibration primitive, and stay there; its rule-out uses
`allowed_misses` like `threshold_for_sensitivity` does.
"""

from __future__ import annotations

import math
from typing import overload

import numpy as np
from numpy.typing import ArrayLike

from services.core.sensitivity_bound import allowed_misses

ECE_BINS = 10


# ---- probabilities ---------------------------------------------------------------------------
@overload
def sigmoid(x: float) -> float: ...
@overload
def sigmoid(x: np.ndarray) -> np.ndarray: ...
def sigmoid(x: float | ArrayLike) -> float | np.ndarray:
    """1 / (1 + exp(-x)) as 0.5 * (1 + tanh(x / 2)): no overflow for any |x|, absolute error below
    2e-16 (relative error grows below p ~ 1e-8: work with logits there). A Python number gives a
    float, anything else an array of float64."""
    if isinstance(x, (int, float)) and not isinstance(x, np.ndarray):
        return 0.5 * (1.0 + math.tanh(0.5 * float(x)))
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def logit(p: float, eps: float = 1e-6) -> float:
    """log(p / (1 - p)), with p clipped to [eps, 1 - eps]."""
    p = min(max(float(p), eps), 1.0 - eps)
    return math.log(p / (1.0 - p))


def platt(logits: ArrayLike, a: float, b: float) -> np.ndarray:
    """Platt-scaled probability sigmoid(a * logit + b)."""
    return sigmoid(a * np.asarray(logits, dtype=np.float64) + b)


def temperature(logits: ArrayLike, t: float) -> np.ndarray:
    """Temperature-scaled probability sigmoid(logit / t)."""
    return sigmoid(np.asarray(logits, dtype=np.float64) / float(t))


# ---- fitting ---------------------------------------------------------------------------------
def fit_platt(logits: ArrayLike, labels: ArrayLike, iters: int = 100, l2: float = 1e-6) -> tuple[float, float]:
    """(a, b) minimising the binary log-loss of sigmoid(a * logit + b) (+ l2/2 * (a² + b²), only so
    that separable data keep a finite answer): Newton's method with backtracking line search, from
    a = 1, b = 0, until the loss stops falling (relative change < 1e-12)."""
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    design = np.stack([x, np.ones_like(x)], axis=1)

    def loss(w: np.ndarray) -> float:
        z = design @ w
        return float(np.sum(np.logaddexp(0.0, z) - y * z) + 0.5 * l2 * w @ w)

    w = np.array([1.0, 0.0])
    current = loss(w)
    for _ in range(iters):
        p = sigmoid(design @ w)
        grad = design.T @ (p - y) + l2 * w
        hess = (design * (p * (1 - p))[:, None]).T @ design + l2 * np.eye(2)
        step = np.linalg.solve(hess, grad)
        t = 1.0
        while t > 1e-8 and loss(w - t * step) > current:
            t /= 2
        w = w - t * step
        new = loss(w)
        if current - new < 1e-12 * max(1.0, abs(current)):
            current = new
            break
        current = new
    return float(w[0]), float(w[1])


# ---- scores ----------------------------------------------------------------------------------
def log_loss(probs: ArrayLike, labels: ArrayLike) -> float:
    """Mean binary log-loss (probabilities clipped to [1e-12, 1 - 1e-12])."""
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def brier(labels: ArrayLike, probs: ArrayLike) -> float:
    """Mean squared difference between probability and label."""
    return float(np.mean((np.asarray(probs, dtype=np.float64) - np.asarray(labels, dtype=np.float64)) ** 2))


def reliability_bins(
    labels: ArrayLike, probs: ArrayLike, bins: int = ECE_BINS, weights: ArrayLike | None = None
) -> list[tuple[float, float, float]]:
    """Equal-width bins of the probability (bin floor(p * bins), 1.0 in the last): (mean predicted,
    observed pneumonia rate, images) for every bin that has images, in order. With ``weights``
    (e.g. to state a set at another prevalence) the means are weighted and the third value is the
    bin's total weight."""
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels, dtype=np.float64)
    w = np.ones_like(p) if weights is None else np.asarray(weights, dtype=np.float64)
    idx = np.minimum((p * bins).astype(int), bins - 1)
    out = []
    for b in range(bins):
        mask = idx == b
        if mask.any():
            if weights is None:
                out.append((float(p[mask].mean()), float(y[mask].mean()), int(mask.sum())))
            else:
                wb = w[mask]
                out.append(
                    (float(np.average(p[mask], weights=wb)), float(np.average(y[mask], weights=wb)), float(wb.sum()))
                )
    return out


def expected_calibration_error(
    labels: ArrayLike, probs: ArrayLike, bins: int = ECE_BINS, weights: ArrayLike | None = None
) -> float:
    """Equal-width bins, weighted by bin size (or bin weight): sum |mean(p) - mean(y)| * n_bin / n."""
    n = len(np.asarray(probs)) if weights is None else float(np.sum(weights))
    ece = 0.0
    for mean_p, observed, count in reliability_bins(labels, probs, bins, weights):
        ece += abs(mean_p - observed) * count / n
    return float(ece)


# ---- thresholds ------------------------------------------------------------------------------
def threshold_metrics(labels: ArrayLike, probs: ArrayLike, threshold: float) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, PPV, NPV and F1 of "p >= threshold" (nan where undefined)."""
    y = np.asarray(labels).astype(bool)
    pred = np.asarray(probs) >= threshold
    tp, tn = float(np.sum(pred & y)), float(np.sum(~pred & ~y))
    fp, fn = float(np.sum(pred & ~y)), float(np.sum(~pred & y))

    def ratio(a: float, b: float) -> float:
        return a / b if b else float("nan")

    return {
        "accuracy": ratio(tp + tn, len(y)),
        "sensitivity": ratio(tp, tp + fn),
        "specificity": ratio(tn, tn + fp),
        "ppv": ratio(tp, tp + fp),
        "npv": ratio(tn, tn + fn),
        "f1": ratio(2 * tp, 2 * tp + fp + fn),
    }


def threshold_for_sensitivity(
    labels: ArrayLike, probs: ArrayLike, sensitivity: float, confidence: float = 0.0
) -> float:
    """The highest threshold t such that "p >= t" keeps `sensitivity` of the pneumonias: on these
    labels (confidence 0: the (k+1)-th lowest pneumonia score, k = floor((1 - sensitivity) n)), or
    with `confidence` on new images (k = `allowed_misses`; the lowest pneumonia score when no k
    reaches it). 0.0 without pneumonias."""
    pos = np.sort(np.asarray(probs, dtype=np.float64)[np.asarray(labels).astype(bool)])
    if not len(pos):
        return 0.0
    k = allowed_misses(len(pos), sensitivity, confidence)
    return float(pos[min(len(pos) - 1, max(k, 0))])


def specificity_at_sensitivity(labels: ArrayLike, scores: ArrayLike, sensitivity: float) -> float:
    """Threshold-free: the specificity ("score < cut" of the healthy) at the highest cut keeping
    `sensitivity` on these labels (nan without healthy images)."""
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    cut = threshold_for_sensitivity(y, s, sensitivity)
    return float(np.mean(s[~y] < cut)) if (~y).any() else float("nan")


def choose_thresholds(
    probs: ArrayLike,
    labels: ArrayLike,
    rule_out_sensitivity: float = 0.99,
    urgent_specificity: float = 0.99,
    operating_sensitivity: float | None = None,
) -> dict[str, float]:
    """A model's operating points on calibrated validation probabilities.

    - ``rule_out``: the highest threshold keeping sensitivity >= rule_out_sensitivity (p below it:
      likely healthy);
    - ``urgent``: the lowest threshold reaching specificity >= urgent_specificity (p at or above it:
      likely pneumonia, surface first);
    - ``operating``: the threshold maximising Youden's J (sensitivity + specificity - 1), or, with
      ``operating_sensitivity``, the highest threshold keeping at least that sensitivity (a
      sensitivity-first operating point, which holds up better under shift than Youden's on an
      internal split).

    The three are kept ordered (rule_out <= operating <= urgent): with a strong model the
    sensitivity target can sit above the specificity target, and then "likely healthy" is still
    never granted above the operating point, nor "urgent" below it.
    """
    p = np.asarray(probs, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    candidates = np.unique(np.concatenate([p, [0.0, 1.0]]))
    pos, neg = max(int(y.sum()), 1), max(int((~y).sum()), 1)
    sens = np.array([(p[y] >= t).sum() / pos for t in candidates])
    spec = np.array([(p[~y] < t).sum() / neg for t in candidates])
    ok_sens = candidates[sens >= rule_out_sensitivity]
    ok_spec = candidates[spec >= urgent_specificity]
    operating = candidates[int(np.argmax(sens + spec - 1.0))]
    if operating_sensitivity is not None:
        ok_op = candidates[sens >= operating_sensitivity]
        operating = ok_op.max() if ok_op.size else candidates[0]
    rule_out = float(ok_sens.max()) if ok_sens.size else 0.0
    urgent = float(ok_spec.min()) if ok_spec.size else 1.0
    return {
        "rule_out": min(rule_out, float(operating)),
        "operating": float(operating),
        "urgent": max(urgent, float(operating)),
    }
