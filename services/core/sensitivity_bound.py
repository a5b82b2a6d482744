"""How many pneumonias a threshold fitted on n labelled ones may miss, so that it keeps a target
sensitivity on the images that come after it with a stated confidence (distribution-free).

A threshold placed at the (k+1)-th lowest score of n pneumonias misses k of them. The share of all
pneumonias scoring below that order statistic is Beta(k+1, n-k) distributed whatever the score's
distribution, so P(true sensitivity >= s) = P(Binomial(n, 1-s) >= k+1). `allowed_misses` is the
largest k with that probability >= `confidence`; with `confidence` 0 it is the sample's own point,
floor((1-s) n), which keeps the target only about half the time on new images.

Used by the thresholds fitted on a site's few labels: `model adapt`'s operating threshold
(services/inference/tools/adapt.py, through services/core/calibration.py `threshold_for_sensitivity`)
and `triage recalibrate`'s rule-out (services/aggregator/tools/calibrate.py). bench/site_adapt.py
measured the sample's own point at a mean held-back sensitivity of 0.92-0.95 (worst draw 0.85) from
100-300 labels.
"""

from __future__ import annotations

import math


def allowed_misses(n_positive: int, sensitivity: float, confidence: float) -> int:
    """The most pneumonias (of n_positive) a fitted threshold may miss; -1 when even missing none
    does not reach the confidence (too few labels: the caller keeps every pneumonia, and more)."""
    miss = 1.0 - sensitivity
    if n_positive <= 0:
        return 0
    if confidence <= 0:
        return math.floor(miss * n_positive + 1e-9)
    below = 0.0  # P(Binomial(n, miss) <= k)
    best = -1
    for k in range(n_positive):
        below += math.comb(n_positive, k) * miss**k * (1.0 - miss) ** (n_positive - k)
        if 1.0 - below >= confidence:  # P(X >= k + 1)
            best = k
        else:
            break
    return best
