"""Calibration on the validation split and operating thresholds (numpy only).

Calibration is Platt scaling ``p = sigmoid(a * logit + b)`` fitted by Newton's method on the
validation logits. It is stored in the interface's temperature form: the offset is folded into the
network's head bias before export (``logit' = logit + b / a``, which shifts the CAM by the same
constant, keeping ``logit' = mean(cam')``) and ``T = 1 / a``, so the calibrated probability is
``sigmoid(logit' / T)``. The offset is needed because the class-weighted loss moves the logits.
"""

from __future__ import annotations

import numpy as np


def sigmoid(x: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * np.asarray(x, dtype=np.float64)))


def fit_platt(logits: np.ndarray, labels: np.ndarray, iters: int = 100, l2: float = 1e-6) -> tuple[float, float]:
    """(a, b) minimising the binary log-loss of sigmoid(a * logit + b): Newton's method with
    backtracking line search, from a = 1, b = 0."""
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


def log_loss(probs: np.ndarray, labels: np.ndarray) -> float:
    p = np.clip(np.asarray(probs, dtype=np.float64), 1e-12, 1 - 1e-12)
    y = np.asarray(labels, dtype=np.float64)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def choose_thresholds(
    probs: np.ndarray,
    labels: np.ndarray,
    rule_out_sensitivity: float = 0.99,
    urgent_specificity: float = 0.99,
    operating_sensitivity: float | None = None,
) -> dict[str, float]:
    """Operating points on calibrated validation probabilities.

    - ``rule_out``: the highest threshold keeping sensitivity >= rule_out_sensitivity (p below it:
      likely healthy);
    - ``urgent``: the lowest threshold reaching specificity >= urgent_specificity (p at or above it:
      likely pneumonia, surface first);
    - ``operating``: the threshold maximising Youden's J (sensitivity + specificity - 1), or, with
      ``operating_sensitivity``, the highest threshold keeping at least that sensitivity (a
      sensitivity-first operating point, which holds up better under shift than Youden's on an
      internal split); accuracy, sensitivity, specificity, PPV, NPV and F1 are reported there.

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
    youden = candidates[int(np.argmax(sens + spec - 1.0))]
    if operating_sensitivity is not None:
        ok_op = candidates[sens >= operating_sensitivity]
        youden = ok_op.max() if ok_op.size else candidates[0]
    rule_out = float(ok_sens.max()) if ok_sens.size else 0.0
    urgent = float(ok_spec.min()) if ok_spec.size else 1.0
    return {
        "rule_out": min(rule_out, float(youden)),
        "operating": float(youden),
        "urgent": max(urgent, float(youden)),
    }
