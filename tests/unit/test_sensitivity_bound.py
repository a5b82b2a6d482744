"""services/core/sensitivity_bound.py: the misses a fitted threshold may allow, against the binomial
tail it is defined by; 0 confidence is the sample's own point (the old rule, exactly)."""

from __future__ import annotations

import math

from services.core.sensitivity_bound import allowed_misses


def tail(n: int, miss: float, k: int) -> float:
    """P(Binomial(n, miss) >= k + 1)."""
    return 1.0 - sum(math.comb(n, i) * miss**i * (1 - miss) ** (n - i) for i in range(k + 1))


def test_zero_confidence_is_the_old_rule() -> None:
    for n in range(1, 400):
        k = allowed_misses(n, 0.95, 0.0)
        assert 1 - k / n >= 0.95 and 1 - (k + 1) / n < 0.95, n


def test_the_largest_k_that_reaches_the_confidence() -> None:
    for n, conf in ((60, 0.8), (100, 0.8), (300, 0.9), (1000, 0.8)):
        k = allowed_misses(n, 0.95, conf)
        assert k >= 0 and tail(n, 0.05, k) >= conf > tail(n, 0.05, k + 1), (n, conf, k)
        assert k < allowed_misses(n, 0.95, 0.0)  # stricter than the sample's own point
    assert allowed_misses(10, 0.95, 0.8) == -1  # 10 pneumonias cannot promise 0.95 at 80 %: miss none
    assert allowed_misses(0, 0.95, 0.8) == 0
