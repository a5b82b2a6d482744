"""Aggregation and agreement maths: our numpy Dawid-Skene / one-coin EM against crowd-kit on the same data,
agreement statistics against published worked examples, trust and dynamic judgments."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from crowdkit.aggregation import DawidSkene, MajorityVote, OneCoinDawidSkene

from services.labeling.job import JobDefinition, load_job
from services.labeling.quality import (
    beta_trust,
    dawid_skene,
    fleiss_kappa,
    judgments_needed,
    krippendorff_alpha_nominal,
    majority_vote,
)


def simulated(seed: int, n_items: int = 300, n_workers: int = 12, per_item: int = 5, adversaries: int = 0):
    rng = np.random.default_rng(seed)
    truth = (rng.random(n_items) < 0.4).astype(int)
    acc = rng.uniform(0.6, 0.95, n_workers)
    acc[:adversaries] = 0.15
    rows = []
    for i in range(n_items):
        for w in rng.choice(n_workers, per_item, replace=False):
            rows.append((i, w, truth[i] if rng.random() < acc[w] else 1 - truth[i]))
    a = np.array(rows)
    return truth, a[:, 0], a[:, 1], a[:, 2]


def as_frame(items, workers, responses) -> pd.DataFrame:
    return pd.DataFrame({"task": items, "worker": workers, "label": responses})


@pytest.mark.parametrize("one_coin", [False, True])
@pytest.mark.parametrize("iterations", [1, 7, 40])
def test_em_matches_crowd_kit(one_coin: bool, iterations: int) -> None:
    truth, items, workers, responses = simulated(seed=iterations)
    ours = dawid_skene(items, workers, responses, len(truth), 12, one_coin=one_coin, max_iter=iterations, tol=-np.inf)
    ref_cls = OneCoinDawidSkene if one_coin else DawidSkene
    ref = ref_cls(n_iter=iterations, tol=-np.inf).fit(as_frame(items, workers, responses))
    ref_post = ref.probas_.sort_index()[[0, 1]].to_numpy()
    np.testing.assert_allclose(ours.posteriors, ref_post, atol=1e-9)


def test_gold_clamping_matches_crowd_kit_true_labels() -> None:
    truth, items, workers, responses = simulated(seed=3, adversaries=3)
    known = {i: int(truth[i]) for i in range(0, 300, 10)}
    ours = dawid_skene(items, workers, responses, 300, 12, known=known, max_iter=20, tol=-np.inf)
    ref = DawidSkene(n_iter=20, tol=-np.inf).fit(as_frame(items, workers, responses), true_labels=pd.Series(known))
    np.testing.assert_allclose(ours.posteriors, ref.probas_.sort_index()[[0, 1]].to_numpy(), atol=1e-9)
    for i, c in known.items():
        assert ours.posteriors[i, c] == 1.0


def test_majority_vote_matches_crowd_kit() -> None:
    truth, items, workers, responses = simulated(seed=5, per_item=4)
    ours = majority_vote(items, responses, len(truth))
    ref = MajorityVote().fit_predict_proba(as_frame(items, workers, responses)).sort_index()[[0, 1]].to_numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-12)


def test_em_beats_majority_vote_with_adversaries_and_learns_them() -> None:
    truth, items, workers, responses = simulated(seed=11, adversaries=3)
    em = dawid_skene(items, workers, responses, len(truth), 12)
    assert em.converged
    em_acc = float((em.posteriors.argmax(1) == truth).mean())
    mv_acc = float((majority_vote(items, responses, len(truth)).argmax(1) == truth).mean())
    assert em_acc > mv_acc
    # adversaries' confusion matrices are learned as "flipped"
    for w in range(3):
        assert em.confusions[w, 0, 1] > 0.6 and em.confusions[w, 1, 0] > 0.6


def test_cant_tell_is_an_observed_answer_not_a_vote() -> None:
    # three workers; item 0: two say pneumonia, one can't tell. Majority ignores can't tell.
    items, workers, responses = np.array([0, 0, 0, 1, 1]), np.array([0, 1, 2, 0, 1]), np.array([0, 0, 2, 1, 1])
    assert majority_vote(items, responses, 2).tolist() == [[1.0, 0.0], [0.0, 1.0]]
    em = dawid_skene(items, workers, responses, 2, 3, n_responses=3, smoothing=1.0)
    assert em.confusions.shape == (3, 2, 3)
    assert em.posteriors[0, 0] > 0.5 and em.posteriors[1, 1] > 0.5


def test_fleiss_kappa_published_example() -> None:
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories -> kappa 0.210
    table = np.array(
        [
            [0, 0, 0, 0, 14],
            [0, 2, 6, 4, 2],
            [0, 0, 3, 5, 6],
            [0, 3, 9, 2, 0],
            [2, 2, 8, 1, 1],
            [7, 7, 0, 0, 0],
            [3, 2, 6, 3, 0],
            [2, 5, 3, 2, 2],
            [6, 5, 2, 1, 0],
            [0, 2, 2, 3, 7],
        ]
    )
    assert fleiss_kappa(table) == pytest.approx(0.2099, abs=1e-4)
    assert np.isnan(fleiss_kappa(np.zeros((3, 2))))


def test_krippendorff_alpha_published_example() -> None:
    # Krippendorff (2011) "Computing Krippendorff's alpha-reliability", nominal example with missing values: 0.743
    coders = [
        [1, 2, 3, 3, 2, 1, 4, 1, 2, None, None, None],
        [1, 2, 3, 3, 2, 2, 4, 1, 2, 5, None, 3],
        [None, 3, 3, 3, 2, 3, 4, 2, 2, 5, 1, None],
        [1, 2, 3, 3, 2, 4, 4, 1, 2, 5, 1, None],
    ]
    counts = np.zeros((12, 5))
    for coder in coders:
        for unit, value in enumerate(coder):
            if value is not None:
                counts[unit, value - 1] += 1
    assert krippendorff_alpha_nominal(counts) == pytest.approx(0.743, abs=1e-3)
    perfect = np.array([[3, 0], [0, 3], [2, 0]])
    assert krippendorff_alpha_nominal(perfect) == pytest.approx(1.0)


def test_beta_trust_and_dynamic_judgments() -> None:
    assert beta_trust(0, 0, 4, 1) == pytest.approx(0.8)  # the prior before any test question
    assert beta_trust(10, 10, 4, 1) > beta_trust(5, 10, 4, 1)
    assert beta_trust(1, 5, 4, 1) < 0.7 < beta_trust(5, 5, 4, 1)
    assert judgments_needed(0, 0.5, 3, 7, 0.95) == 3
    assert judgments_needed(3, 0.99, 3, 7, 0.95) == 3  # confident: done
    assert judgments_needed(3, 0.80, 3, 7, 0.95) == 4  # not confident: one more
    assert judgments_needed(7, 0.60, 3, 7, 0.95) == 7  # cap reached


def test_job_file_loads_and_is_validated() -> None:
    job = load_job()
    assert job.redundancy.judgments_per_image == 3 and job.redundancy.max_judgments >= 3
    assert 0 < job.gold.hidden_ratio < 1 and job.key.startswith("pneumonia-cxr@")
    bad = job.model_dump()
    bad["redundancy"]["max_judgments"] = 2
    with pytest.raises(ValueError):
        JobDefinition.model_validate(bad)
    bad = job.model_dump()
    bad["answers"] = bad["answers"][:2]
    with pytest.raises(ValueError):
        JobDefinition.model_validate(bad)


def simulated_with_confidence(seed: int, n_items: int = 300, n_workers: int = 10, per_item: int = 3):
    """Workers right 75 % of the time; right answers are "sure" 80 % of the time, wrong ones 25 %."""
    rng = np.random.default_rng(seed)
    truth = (rng.random(n_items) < 0.5).astype(int)
    rows = []
    for i in range(n_items):
        for w in rng.choice(n_workers, per_item, replace=False):
            right = rng.random() < 0.75
            unsure = rng.random() > (0.8 if right else 0.25)
            rows.append((i, w, truth[i] if right else 1 - truth[i], unsure))
    a = np.array(rows)
    return truth, a[:, 0], a[:, 1], a[:, 2], a[:, 3].astype(bool)


def test_confidence_is_learned_and_improves_accuracy() -> None:
    gains = []
    for seed in range(4):
        truth, items, workers, responses, unsure = simulated_with_confidence(seed)
        plain = dawid_skene(items, workers, responses, len(truth), 10, smoothing=1.0)
        conf = dawid_skene(items, workers, responses, len(truth), 10, smoothing=1.0, unsure=unsure)
        rho = conf.confidence_factor
        assert rho is not None and plain.confidence_factor is None
        # P(probably | answer right) and P(probably | answer wrong), pooled: close to 0.2 and 0.75
        assert abs(rho[1, 1] - 0.2) < 0.08 and abs(rho[1, 0] - 0.75) < 0.15, rho
        acc = [float(np.mean(a.posteriors.argmax(axis=1) == truth)) for a in (plain, conf)]
        gains.append(acc[1] - acc[0])
    assert np.mean(gains) > 0.02, gains


def test_a_sure_answer_outweighs_a_probably_one() -> None:
    truth, items, workers, responses, unsure = simulated_with_confidence(9)
    n = len(truth)
    # one more item: two similar workers disagree, worker 0 "sure" says 0, worker 1 "probably" says 1
    items = np.append(items, [n, n])
    workers = np.append(workers, [0, 1])
    responses = np.append(responses, [0, 1])
    unsure = np.append(unsure, [False, True])
    agg = dawid_skene(items, workers, responses, n + 1, 10, smoothing=1.0, unsure=unsure)
    assert agg.posteriors[n, 0] > 0.6
    unsure[-2:] = [True, False]  # now worker 0 is unsure and worker 1 sure
    swapped = dawid_skene(items, workers, responses, n + 1, 10, smoothing=1.0, unsure=unsure)
    assert swapped.posteriors[n, 0] < 0.4


def test_model_prior_closes_agreeing_items_and_gold_stays_clamped() -> None:
    truth, items, workers, responses = simulated(4, n_items=200, per_item=3)
    n = len(truth)
    rng = np.random.default_rng(0)
    # a good model: 90 % confident and right, occasionally confident and wrong
    p_true = np.where(rng.random(n) < 0.95, 0.9, 0.1)
    prior = np.where(truth[:, None] == np.arange(2)[None, :], p_true[:, None], 1 - p_true[:, None])
    first = np.array([np.flatnonzero(items == i)[0] for i in range(n)])  # one answer per item
    plain = dawid_skene(items[first], workers[first], responses[first], n, 12, smoothing=1.0)
    assisted = dawid_skene(items[first], workers[first], responses[first], n, 12, smoothing=1.0, item_prior=prior)
    agree = (responses[first] == prior.argmax(axis=1)) & (prior.max(axis=1) > 0.8)
    # where the model and the one annotator agree, the posterior is more confident with the prior
    assert np.all(assisted.posteriors.max(axis=1)[agree] > plain.posteriors.max(axis=1)[agree])
    acc = [float(np.mean(a.posteriors.argmax(axis=1) == truth)) for a in (plain, assisted)]
    assert acc[1] > acc[0] + 0.05, acc
    # clipping: a model that says class 0 with p = 1 everywhere is capped; the looser the cap, the more
    # the annotators can overrule it, and no posterior becomes certain from the model alone
    certain = np.tile([1.0, 0.0], (n, 1))
    accs = []
    for clip in (0.01, 0.1, 0.3):
        agg = dawid_skene(items, workers, responses, n, 12, smoothing=1.0, item_prior=certain, prior_clip=clip)
        accs.append(float(np.mean(agg.posteriors.argmax(axis=1) == truth)))
        assert agg.posteriors[:, 0].max() < 1.0
    assert accs == sorted(accs) and accs[0] < accs[-1], accs
    # gold stays clamped whatever the model says
    known = {0: int(truth[0])}
    wrong_prior = prior.copy()
    wrong_prior[0] = np.eye(2)[1 - truth[0]]
    clamped = dawid_skene(items, workers, responses, n, 12, smoothing=1.0, item_prior=wrong_prior, known=known)
    assert clamped.posteriors[0, truth[0]] == 1.0
