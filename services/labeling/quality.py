"""Quality control and aggregation maths, in numpy: Beta trust, Dawid-Skene and one-coin EM, weighted
majority vote, Fleiss' kappa and Krippendorff's alpha. Pure functions, no I/O (tested against crowd-kit).

Judgments are three parallel integer arrays: item index, worker index, response index. True classes
are 0..K-1; responses are 0..L-1 with L >= K (here K=2: pneumonia, healthy; L=3 adds "can't tell",
which the annotator model treats as one more observable answer, so a worker's habit of saying
"can't tell" on pneumonia cases is learned rather than thrown away).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def beta_trust(correct: int, total: int, prior_correct: float, prior_wrong: float) -> float:
    """Posterior mean of an annotator's gold accuracy under a Beta(prior_correct, prior_wrong) prior."""
    return (correct + prior_correct) / (total + prior_correct + prior_wrong)


@dataclass
class Aggregate:
    posteriors: np.ndarray  # (n_items, K) P(true class | answers)
    confusions: np.ndarray  # (n_workers, K, L) P(response | true class) per worker
    priors: np.ndarray  # (K,) class prevalence
    iterations: int
    converged: bool
    method: str
    confidence_factor: np.ndarray | None = None  # rho: [unsure?, agrees?] -> probability


def _validate(items: np.ndarray, workers: np.ndarray, responses: np.ndarray) -> None:
    if not (len(items) == len(workers) == len(responses)):
        raise ValueError("items, workers and responses must have the same length")


def majority_vote(
    items: np.ndarray,
    responses: np.ndarray,
    n_items: int,
    n_classes: int = 2,
    weights: np.ndarray | None = None,
) -> np.ndarray:
    """(n_items, K) vote shares among responses < K (can't tell is no vote); uniform where no votes."""
    items, responses = np.asarray(items, int), np.asarray(responses, int)
    w = np.ones(len(items)) if weights is None else np.asarray(weights, float)
    counts = np.zeros((n_items, n_classes))
    keep = responses < n_classes
    np.add.at(counts, (items[keep], responses[keep]), w[keep])
    totals = counts.sum(axis=1, keepdims=True)
    return np.where(totals > 0, counts / np.where(totals > 0, totals, 1), 1.0 / n_classes)


def dawid_skene(
    items: np.ndarray,
    workers: np.ndarray,
    responses: np.ndarray,
    n_items: int,
    n_workers: int,
    n_classes: int = 2,
    n_responses: int | None = None,
    known: dict[int, int] | None = None,
    one_coin: bool = False,
    smoothing: float = 0.0,
    max_iter: int = 100,
    tol: float = 1e-5,
    unsure: np.ndarray | None = None,
    item_prior: np.ndarray | None = None,
    prior_weight: float = 1.0,
    prior_clip: float = 0.01,
) -> Aggregate:
    """Dawid & Skene (1979) EM; one_coin=True ties each worker's confusion to one accuracy number.

    known: item -> true class for gold items (their posterior is clamped, which anchors the confusions).
    smoothing: Dirichlet pseudo-count added to every confusion cell (diagonal gets 2x), so a worker
    with few judgments is pulled toward a better-than-chance prior instead of an extreme matrix.
    Initialised from majority vote, stopped when the log-likelihood gains less than tol per judgment.

    unsure: per judgment, True where the annotator said "probably" (False: "sure"). Confidence
    enters as a factor pooled over all annotators (a few answers per annotator cannot fit it per
    person): P(answer, confidence | class, worker) = confusion[worker][class, answer] *
    rho[confidence, answer == class], rho estimated in the M-step (how often right answers are "sure"
    compared with wrong ones). "Can't tell" answers carry no confidence factor.
    item_prior: (n_items, K) a model's probabilities, entering as a per-item prior (model-assisted
    consensus, as in CROWDLAB): log P(class) becomes log prior + prior_weight * (log p_model - log prior),
    with p_model clipped to [prior_clip, 1 - prior_clip] so the model alone can never close an item
    against confident annotators. Gold items stay clamped.
    """
    items, workers, responses = (np.asarray(a, dtype=int) for a in (items, workers, responses))
    _validate(items, workers, responses)
    L = n_responses or max(n_classes, int(responses.max(initial=0)) + 1)
    K = n_classes
    known = known or {}
    known_idx = np.array(sorted(known), dtype=int)
    known_cls = np.array([known[i] for i in known_idx], dtype=int)

    def clamp(t: np.ndarray) -> np.ndarray:
        if len(known_idx):
            t[known_idx] = 0.0
            t[known_idx, known_cls] = 1.0
        return t

    post = clamp(majority_vote(items, responses, n_items, K))
    pseudo = np.full((K, L), smoothing)
    pseudo[np.arange(K), np.arange(K)] += smoothing
    loglik_prev = -np.inf
    converged = False
    it = 0
    conf = np.full((n_workers, K, L), 1.0 / L)
    priors = np.full(K, 1.0 / K)
    use_conf = unsure is not None and len(items) > 0
    if use_conf:
        unsure_idx = np.asarray(unsure, dtype=bool).astype(int)
        voted = responses < K
    if item_prior is not None:
        model_log = np.log(np.clip(np.asarray(item_prior, float), prior_clip, 1 - prior_clip))
        model_log -= np.logaddexp.reduce(model_log, axis=1, keepdims=True)
    rho = np.full((2, 2), 0.5)  # [unsure?, agrees with class?]
    for it in range(1, max_iter + 1):  # noqa: B007 (it is the iteration count returned)
        # M-step: confusions and class priors from the current posteriors
        counts = np.zeros((n_workers, K, L))
        np.add.at(counts, (workers, slice(None), responses), post[items])
        if one_coin:
            diag_mask = np.zeros((K, L), bool)
            diag_mask[np.arange(K), np.arange(K)] = True
            right = (counts * diag_mask).sum(axis=(1, 2)) + smoothing * 2
            total = counts.sum(axis=(1, 2)) + smoothing * (L + 1)
            acc = np.where(total > 0, right / np.where(total > 0, total, 1), 0.5)
            acc = np.clip(acc, 1e-6, 1 - 1e-6)
            conf = np.where(diag_mask[None], acc[:, None, None], ((1 - acc) / (L - 1))[:, None, None])
        else:
            counts = counts + pseudo
            sums = counts.sum(axis=2, keepdims=True)
            conf = np.where(sums > 0, counts / np.where(sums > 0, sums, 1), 1.0 / L)
        priors = post.mean(axis=0) if n_items else np.full(K, 1.0 / K)
        if use_conf:
            # pooled P(confidence | the answer agrees / disagrees with the class), pseudo-count 1
            agree = np.zeros(len(items))
            agree[voted] = post[items[voted], responses[voted]]
            for a, w in ((1, agree), (0, np.where(voted, 1.0 - agree, 0.0))):
                n_unsure = float(w[unsure_idx == 1].sum()) + 1.0
                n_all = float(w.sum()) + 2.0
                rho[1, a] = n_unsure / n_all
                rho[0, a] = 1.0 - rho[1, a]
        # E-step
        with np.errstate(divide="ignore"):
            log_conf = np.log(np.clip(conf, 1e-300, None))
            log_prior = np.log(np.clip(priors, 1e-300, None))
            log_post = np.tile(log_prior, (n_items, 1))
        if item_prior is not None:
            log_post = log_post + prior_weight * (model_log - log_prior)
        np.add.at(log_post, items, log_conf[workers, :, responses])
        if use_conf:
            log_rho = np.log(rho)
            factor = np.zeros((len(items), K))
            for k in range(K):
                factor[voted, k] = log_rho[unsure_idx[voted], (responses[voted] == k).astype(int)]
            np.add.at(log_post, items, factor)
        norm = np.logaddexp.reduce(log_post, axis=1, keepdims=True)
        post = clamp(np.exp(log_post - norm))
        loglik = float(norm.sum()) / max(len(items), 1)
        if loglik - loglik_prev < tol:
            converged = True
            break
        loglik_prev = loglik
    return Aggregate(
        post, conf, priors, it, converged, "one_coin" if one_coin else "dawid_skene", rho if use_conf else None
    )


def fleiss_kappa(counts: np.ndarray) -> float:
    """Fleiss' kappa from an (items, categories) count matrix; items may have different rater counts
    (items with fewer than 2 ratings are ignored). NaN when undefined."""
    counts = np.asarray(counts, float)
    n = counts.sum(axis=1)
    counts, n = counts[n >= 2], n[n >= 2]
    if len(n) == 0:
        return float("nan")
    p_i = ((counts**2).sum(axis=1) - n) / (n * (n - 1))
    p_bar = p_i.mean()
    p_j = counts.sum(axis=0) / n.sum()
    p_e = float((p_j**2).sum())
    return float("nan") if p_e >= 1.0 else float((p_bar - p_e) / (1 - p_e))


def krippendorff_alpha_nominal(counts: np.ndarray) -> float:
    """Krippendorff's alpha for nominal data from an (units, values) count matrix (missing data allowed:
    units with fewer than 2 values are not pairable and are ignored). NaN when undefined."""
    counts = np.asarray(counts, float)
    m = counts.sum(axis=1)
    counts, m = counts[m >= 2], m[m >= 2]
    if len(m) == 0:
        return float("nan")
    # coincidence matrix o_ck = sum_u n_uc * (n_uk - [c==k]) / (m_u - 1)
    o = np.einsum("uc,uk->ck", counts / (m - 1)[:, None], counts) - np.diag((counts / (m - 1)[:, None]).sum(axis=0))
    n_c = o.sum(axis=1)
    n = n_c.sum()
    expected = n**2 - (n_c**2).sum()
    if expected == 0:
        return float("nan")
    return float(1 - (n - 1) * (n - np.trace(o)) / expected)


def judgments_needed(valid: int, confidence: float, judgments_per_image: int, cap: int, target: float) -> int:
    """How many valid judgments an image should end up with, given what it has (dynamic judgments)."""
    if valid < judgments_per_image:
        return judgments_per_image
    if confidence >= target or valid >= cap:
        return valid
    return valid + 1
