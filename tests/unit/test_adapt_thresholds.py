"""model adapt's operating threshold (services/core/calibration.py `threshold_for_sensitivity` with a
confidence, as services/inference/tools/adapt.py uses it): a distribution-free bound that keeps the
target sensitivity with the chosen confidence, checked against the binomial tail it is defined by and
by simulation; and adapt's patient folds."""

from __future__ import annotations

import math

import numpy as np

from services.core.calibration import threshold_for_sensitivity
from services.inference.tools.adapt import patient_folds
from services.inference.tools.training.dataset import ImageRecord


def operating_threshold(pos_probs: np.ndarray, sensitivity: float, confidence: float) -> float:
    """The threshold from pneumonia probabilities alone (every label 1)."""
    return threshold_for_sensitivity(np.ones(len(pos_probs)), pos_probs, sensitivity, confidence)


def tail(n: int, miss: float, k: int) -> float:
    """P(Binomial(n, miss) >= k + 1)."""
    return 1.0 - sum(math.comb(n, i) * miss**i * (1 - miss) ** (n - i) for i in range(k + 1))


def test_the_order_statistic_is_the_largest_that_reaches_the_confidence() -> None:
    probs = np.linspace(0.3, 1.0, 60)
    assert operating_threshold(probs, 0.95, 0.0) == probs[3]  # the sample's own 95 % point
    t = operating_threshold(probs, 0.95, 0.8)
    k = int(np.flatnonzero(probs == t)[0])
    assert tail(60, 0.05, k) >= 0.8 > tail(60, 0.05, k + 1)
    assert k == 1
    assert operating_threshold(probs[:10], 0.95, 0.8) == probs[0]  # too few: the lowest pneumonia
    assert operating_threshold(np.array([]), 0.95, 0.8) == 0.0


def test_it_keeps_the_sensitivity_at_least_as_often_as_promised() -> None:
    """Pneumonia probabilities from one population: the threshold from 60 of them keeps >= 95 % of
    the whole population in >= 80 % of draws; the sample's own 95 % point in about half."""
    rng = np.random.default_rng(3)
    population = rng.beta(8, 2, 200_000)
    kept_conservative = kept_plain = 0
    draws = 400
    for _ in range(draws):
        sample = rng.choice(population, 60, replace=False)
        kept_conservative += np.mean(population >= operating_threshold(sample, 0.95, 0.8)) >= 0.95
        kept_plain += np.mean(population >= operating_threshold(sample, 0.95, 0.0)) >= 0.95
    assert kept_conservative / draws >= 0.78
    assert kept_plain / draws < 0.7


def test_patient_folds_keep_patients_whole_and_cover_the_pool() -> None:
    records = [ImageRecord(f"/x/{p}-{i}.png", p % 2, f"p{p}", f"{p}-{i}") for p in range(30) for i in range(1 + p % 3)]  # type: ignore[arg-type]
    folds = patient_folds(records, 4, seed=1)
    assert sorted(np.concatenate(folds).tolist()) == list(range(len(records)))
    owner = {records[i].patient: k for k, fold in enumerate(folds) for i in fold}
    assert all(owner[records[i].patient] == k for k, fold in enumerate(folds) for i in fold)
    assert all({records[i].label for i in fold} == {0, 1} for fold in folds)
