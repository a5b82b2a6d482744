"""Fusion of the model and the crowd into one posterior P(pneumonia) per image.

The model is one more voter in a class-conditional annotator model. Each piece of evidence becomes
log-odds for pneumonia:

* the model: the logit of its calibrated probability;
* each human vote: ± log(a / (1 - a)), with a = the annotator's trust (gold accuracy) — the one-coin
  Dawid-Skene weight of a voter who is right with probability a ("can't tell" adds nothing).
  "Sure" and "probably" votes are summed separately, so their weights are learned apart;
* the labeling service's aggregate, used only when no individual votes have arrived.

The posterior is a logistic regression (stacking) on those features: weights and intercept are
LEARNED from labeled data by `pneumotriage triage calibrate` and kept in the policy file. Weights are
constrained to be non-negative, which makes the posterior monotone in every piece of evidence: more
pneumonia evidence never lowers it. The defaults (before calibration) are the naive-Bayes weights:
independent voters, calibrated model.

Crowd evidence is computed in two places, on purpose. The labeling service has its own crowd
posterior (`services/labeling/votes.py` `aggregate_job`, maths in `services/labeling/quality.py`:
Dawid-Skene EM over the whole job, or a trust-weighted majority vote while there is too little data;
published as `label.aggregated`). It answers the labeling job's questions (is this image's label
settled, how many more judgments does it need, what goes into the training export) and is re-fitted
over every image whenever any answer changes. The vote evidence here answers the triage question: each
`judgment.submitted` is added as it arrives, with the trust the event carries, so one vote moves a
flag at once, and the learned non-negative weights keep the posterior monotone in every single vote
(a whole-job re-fit can move an image's posterior without any new evidence about that image).
Labeling's posterior is therefore used only while no vote of the image has arrived, never on top of
the votes it was computed from (that would count them twice). The two share no code because a
service never imports another one; they meet only through those events.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np

from services.core.calibration import logit as core_logit
from services.core.calibration import sigmoid

FEATURES: tuple[str, ...] = ("model_logit", "human_sure_logodds", "human_probably_logodds", "aggregate_logodds")
MAX_LOGIT = 8.0  # clip |log-odds| of a single source: p = 0.9997
MIN_TRUST, MAX_TRUST = 0.5, 0.99


def logit(p: float) -> float:
    """The log-odds of one source, clipped to +-MAX_LOGIT (so no single source decides alone)."""
    return max(-MAX_LOGIT, min(MAX_LOGIT, core_logit(p)))


@dataclass(frozen=True)
class Vote:
    answer: str  # "pneumonia" | "healthy" | "cant_tell"
    confidence: str = "sure"  # "sure" | "probably"
    trust: float = 0.8

    @property
    def logodds(self) -> float:
        """The vote's evidence for pneumonia (0 for "can't tell" or an annotator no better than chance)."""
        if self.answer not in ("pneumonia", "healthy"):
            return 0.0
        a = min(max(self.trust, MIN_TRUST), MAX_TRUST)
        w = core_logit(a)  # the one-coin Dawid-Skene weight
        return w if self.answer == "pneumonia" else -w


@dataclass(frozen=True)
class Evidence:
    """Everything known about one image at one moment."""

    model_probability: float | None = None
    votes: tuple[Vote, ...] = ()
    aggregate_p: float | None = None
    model_version: str = ""
    gate: str = ""  # the inference input gate: "" | "ok" | "borderline" | "refuse"
    gate_reason: str = ""

    @property
    def has_model(self) -> bool:
        return self.model_probability is not None

    @property
    def human_votes(self) -> int:
        return sum(1 for v in self.votes if v.answer in ("pneumonia", "healthy"))

    @property
    def human_logodds(self) -> float:
        """Net trust-weighted human evidence (positive: the crowd leans pneumonia)."""
        if self.votes:
            return sum(v.logodds for v in self.votes)
        return logit(self.aggregate_p) if self.aggregate_p is not None else 0.0

    def features(self) -> np.ndarray:
        model = logit(self.model_probability) if self.model_probability is not None else 0.0
        sure = sum(v.logodds for v in self.votes if v.confidence != "probably")
        probably = sum(v.logodds for v in self.votes if v.confidence == "probably")
        aggregate = logit(self.aggregate_p) if (self.aggregate_p is not None and not self.votes) else 0.0
        return np.array([model, sure, probably, aggregate], dtype=np.float64)


@dataclass
class FusionWeights:
    intercept: float = 0.0
    weights: dict[str, float] = field(default_factory=lambda: {f: (0.5 if "probably" in f else 1.0) for f in FEATURES})
    learned: dict[str, bool] = field(default_factory=lambda: dict.fromkeys(FEATURES, False))

    def vector(self) -> np.ndarray:
        return np.array([max(0.0, self.weights.get(f, 0.0)) for f in FEATURES], dtype=np.float64)

    def posterior(self, evidence: Evidence) -> float:
        return sigmoid(self.intercept + float(self.vector() @ evidence.features()))

    def posteriors(self, x: np.ndarray) -> np.ndarray:
        return sigmoid(self.intercept + x @ self.vector())

    def to_dict(self) -> dict[str, object]:
        return {"intercept": self.intercept, "weights": dict(self.weights), "learned": dict(self.learned)}

    @classmethod
    def from_dict(cls, d: dict[str, object]) -> FusionWeights:
        w = cls()
        w.intercept = float(d.get("intercept", 0.0))  # type: ignore[arg-type]
        w.weights.update({k: float(v) for k, v in dict(d.get("weights", {})).items()})  # type: ignore[call-overload]
        w.learned.update({k: bool(v) for k, v in dict(d.get("learned", {})).items()})  # type: ignore[call-overload]
        return w


def feature_matrix(evidence: Iterable[Evidence]) -> np.ndarray:
    rows = [e.features() for e in evidence]
    return np.vstack(rows) if rows else np.zeros((0, len(FEATURES)))


def fit_weights(
    x: np.ndarray, y: Sequence[int], c: float = 1.0, sample_weight: np.ndarray | None = None
) -> FusionWeights:
    """Logistic-regression stacking with non-negative weights.

    Features that never vary in the data keep their default (prior) weight and are marked not
    learned. A feature whose fitted weight comes out negative (evidence that points the wrong way,
    e.g. collinear with a stronger one) is dropped (weight 0) and the rest refitted, so that the
    posterior stays monotone in every source.
    """
    from sklearn.linear_model import LogisticRegression

    y_arr = np.asarray(y, dtype=int)
    result = FusionWeights()
    active = [i for i in range(x.shape[1]) if float(np.std(x[:, i])) > 1e-9]
    while True:
        model = LogisticRegression(C=c, max_iter=2000)
        if active:
            model.fit(x[:, active], y_arr, sample_weight=sample_weight)
            coefs, intercept = model.coef_[0], float(model.intercept_[0])
        else:
            sw = np.ones(len(y_arr)) if sample_weight is None else sample_weight
            prevalence = float((sw * y_arr).sum() / sw.sum())
            coefs, intercept = np.zeros(0), core_logit(prevalence)
        negative = [active[j] for j, cf in enumerate(coefs) if cf < 0]
        if not negative:
            break
        active = [i for i in active if i not in negative]
        for i in negative:
            result.weights[FEATURES[i]] = 0.0
            result.learned[FEATURES[i]] = True
    result.intercept = intercept
    for j, i in enumerate(active):
        result.weights[FEATURES[i]] = float(coefs[j])
        result.learned[FEATURES[i]] = True
    return result
