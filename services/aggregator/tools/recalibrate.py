"""Site recalibration: refit the model's probabilities and the triage thresholds from this site's
confirmed labels (`pneumotriage triage recalibrate`), versioned, with roll-back.

Why: a hospital's images differ from the training data (detector, processing, population); the
model's ranking may survive while its probabilities — and so every fixed threshold — do not.

Labels (from the aggregator's own database, nothing leaves the site):

* clinician reviews (confirm/overrule): the study's final flag as a label (URGENT / SUSPECTED =
  pneumonia, LIKELY_HEALTHY = healthy; UNCERTAIN / NOT_TRIAGED give no label). A healthy label
  applies to every image of the study, a pneumonia label only to a single-image study (which image
  shows it is otherwise unknown);
* high-trust crowd consensus: the labeling service's latest complete aggregate with confidence
  >= ``crowd_confidence`` (0.95) and at least ``crowd_judgments`` (3) judgments. A clinician's label
  wins over the crowd's for the same image.

Images the input gate refused are left out. What is fitted, for one model version:

1. Platt scaling of the raw logit, P = sigmoid(a * logit + b), a > 0 (the ranking is kept), fitted
   by services/core/calibration.py `fit_platt` (as the model's own calibration at training);
2. the triage thresholds, re-chosen with `triage calibrate`'s rule (rule-out sensitivity >= 0.95,
   URGENT PPV >= 0.90, ...) on the fused posterior with the recalibrated model probability; the
   rule-out keeps its sensitivity with 80 % confidence on new images (`--rule-out-confidence`,
   services/core/sensitivity_bound.py), not only on the few hundred labels it is fitted on.

Guard: at least ``min_labels`` (100) labels and ``min_per_class`` (20) of each class, else nothing
is written. 95 % bootstrap intervals (resampling the labels, refitting both steps) are reported for
a, b, the thresholds and the rule-out sensitivity / specificity. Each run writes a new version
``site-calibration-vN.yaml`` into ``PT_AGGREGATOR_SITE_CALIBRATION_DIR``; ``ACTIVE`` names the one in
use (``none`` = the model's own calibration). ``--rollback`` activates the previous version,
``--off`` none. The aggregator reads the active version when it starts: that part (the
`SiteCalibration` file and its versions) is runtime code, services/aggregator/site_calibration.py;
this module is the offline fitting only.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from services.aggregator.flags import HEALTHY, MEANS
from services.aggregator.fusion import Evidence
from services.aggregator.models import Image, LabelAggregateRow, PredictionRow, Review, Study
from services.aggregator.policy import Policy, Thresholds
from services.aggregator.site_calibration import SiteCalibration
from services.aggregator.tools.calibrate import OperatingPoints, choose_thresholds
from services.core.calibration import fit_platt, platt, sigmoid

# The site's rule-out keeps its sensitivity with this confidence on new images (a few hundred labels:
# the sample's own point kept 0.92-0.95 on held-back images, bench/site_adapt.py)
SITE_RULE_OUT_CONFIDENCE = 0.8
LABEL_OF_FLAG = {flag: int(means == "pneumonia") for flag, means in MEANS.items()}  # from the flag registry


class NotEnoughLabels(ValueError):
    """The minimum-count guard: too few confirmed labels to recalibrate."""


@dataclass(frozen=True)
class SiteLabel:
    sop_uid: str
    logit: float
    probability: float  # as published (the model's own calibration)
    label: int
    source: str  # clinician | crowd
    model_name: str
    model_version: str


# ---- labels ----------------------------------------------------------------------------------
async def collect_labels(s: AsyncSession, crowd_confidence: float = 0.95, crowd_judgments: int = 3) -> list[SiteLabel]:
    """Every image with a model prediction and a confirmed label (clinician over crowd)."""
    preds: dict[str, PredictionRow] = {}
    for row in (await s.scalars(select(PredictionRow).order_by(PredictionRow.id))).all():
        preds[row.sop_uid] = row  # the newest prediction per image
    labels: dict[str, tuple[int, str]] = {}
    latest_agg: dict[str, LabelAggregateRow] = {}
    for agg in (await s.scalars(select(LabelAggregateRow).order_by(LabelAggregateRow.revision))).all():
        latest_agg[agg.sop_uid] = agg
    for sop, agg in latest_agg.items():
        confident = max(agg.p_pneumonia, 1 - agg.p_pneumonia) >= crowd_confidence
        if agg.complete and agg.judgments >= crowd_judgments and confident:
            labels[sop] = (int(agg.p_pneumonia >= 0.5), "crowd")
    latest_review: dict[str, Review] = {}
    for review in (await s.scalars(select(Review).order_by(Review.id))).all():
        latest_review[review.study_uid] = review
    for study_uid, review in latest_review.items():
        label = LABEL_OF_FLAG.get(review.flag_after)
        if label is None:
            continue
        study = await s.get(Study, study_uid)
        if study is None or study.flag != review.flag_after:  # reviewed again since, or changed
            continue
        images = (await s.scalars(select(Image.sop_uid).where(Image.study_uid == study_uid))).all()
        if label == 1 and len(images) != 1:
            continue
        for sop in images:
            labels[sop] = (label, "clinician")
    out = []
    for sop, (label, source) in sorted(labels.items()):
        pred = preds.get(sop)
        if pred is None or pred.gate_verdict == "refuse":
            continue
        out.append(
            SiteLabel(
                sop, float(pred.logit), float(pred.probability), label, source, pred.model_name, pred.model_version
            )
        )
    return out


# ---- fitting ---------------------------------------------------------------------------------
def fit_ranking_platt(logits: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Platt (a, b) on the site's labels (services/core/calibration.py `fit_platt`: Newton's method,
    the same fit as the model's own calibration at training); refused unless a > 0 (ranking kept)."""
    a, b = fit_platt(logits, y)
    if not a > 0:
        raise ValueError(f"the model's scores do not rank this site's labels (Platt slope {a:.3f} <= 0)")
    return a, b


def site_thresholds(
    logits: np.ndarray, y: np.ndarray, a: float, b: float, policy: Policy, ops: OperatingPoints
) -> Thresholds:
    evidence = [Evidence(model_probability=sigmoid(a * float(z) + b)) for z in logits]
    p = np.array([policy.fusion.posterior(e) for e in evidence])
    blocked = np.array([bool(policy.rule_out_blockers(e)) for e in evidence])
    return choose_thresholds(p, y, blocked, ops, policy.thresholds)


def rule_out_metrics(
    probabilities: np.ndarray, y: np.ndarray, policy: Policy, thresholds: Thresholds
) -> dict[str, float | None]:
    """Model-only evidence: the rule-out's sensitivity (pneumonia not cleared) and specificity
    (healthy cleared as LIKELY_HEALTHY) with the given model probabilities and thresholds."""
    trial = Policy(policy.fusion, thresholds)
    flags = np.array([trial.classify(Evidence(model_probability=float(p)))[0] for p in probabilities])
    cleared = flags == HEALTHY
    pos, neg = y == 1, y == 0
    return {
        "sensitivity": float((~cleared & pos).sum() / pos.sum()) if pos.any() else None,
        "specificity": float((cleared & neg).sum() / neg.sum()) if neg.any() else None,
    }


def _ci(values: Sequence[float]) -> list[float] | None:
    v = [x for x in values if x is not None and math.isfinite(x)]
    if len(v) < 10:
        return None
    lo, hi = np.quantile(v, [0.025, 0.975])
    return [round(float(lo), 4), round(float(hi), 4)]


def fit_site_calibration(
    labels: Sequence[SiteLabel],
    policy: Policy,
    ops: OperatingPoints | None = None,
    min_labels: int = 100,
    min_per_class: int = 20,
    bootstrap: int = 200,
    seed: int = 0,
    model: tuple[str, str] | None = None,
    on_resample: Callable[[], None] | None = None,
) -> SiteCalibration:
    """Platt + thresholds from the labels of one model version (the most labeled one by default).
    `on_resample` is called after each bootstrap resample (a progress bar's tick)."""
    ops = ops or OperatingPoints(rule_out_confidence=SITE_RULE_OUT_CONFIDENCE)
    if model is None:
        counts: dict[tuple[str, str], int] = {}
        for lab in labels:
            counts[(lab.model_name, lab.model_version)] = counts.get((lab.model_name, lab.model_version), 0) + 1
        if not counts:
            raise NotEnoughLabels("no confirmed labels with a model prediction yet")
        model = max(counts, key=lambda k: counts[k])
    mine = [lab for lab in labels if (lab.model_name, lab.model_version) == model]
    y = np.array([lab.label for lab in mine], dtype=int)
    x = np.array([lab.logit for lab in mine], dtype=np.float64)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    if len(mine) < min_labels or min(n_pos, n_neg) < min_per_class:
        raise NotEnoughLabels(
            f"{len(mine)} confirmed labels for model {model[0]} v{model[1]} ({n_pos} pneumonia, {n_neg} healthy): "
            f"at least {min_labels} and {min_per_class} of each class are needed"
        )
    a, b = fit_ranking_platt(x, y)
    thresholds = site_thresholds(x, y, a, b, policy, ops)
    published = np.array([lab.probability for lab in mine], dtype=np.float64)
    before = rule_out_metrics(published, y, policy, policy.thresholds)
    after = rule_out_metrics(platt(x, a, b), y, policy, thresholds)
    rng = np.random.default_rng(seed)
    boot: dict[str, list[float]] = {k: [] for k in ("a", "b", "rule_out", "urgent", "sensitivity", "specificity")}
    for _ in range(bootstrap):
        if on_resample is not None:
            on_resample()
        idx = rng.integers(0, len(y), len(y))
        yb, xb = y[idx], x[idx]
        if yb.min() == yb.max():
            continue
        try:
            ab, bb = fit_ranking_platt(xb, yb)
        except ValueError:
            continue
        tb = site_thresholds(xb, yb, ab, bb, policy, ops)
        # the fitted thresholds judged on the labels left out of this resample (out-of-bag)
        oob = np.setdiff1d(np.arange(len(y)), idx)
        mb = rule_out_metrics(platt(x[oob], ab, bb), y[oob], policy, tb) if oob.size else {}
        for key, val in (("a", ab), ("b", bb), ("rule_out", tb.rule_out), ("urgent", tb.urgent)):
            boot[key].append(val)
        boot["sensitivity"].append(mb.get("sensitivity"))  # type: ignore[arg-type]
        boot["specificity"].append(mb.get("specificity"))  # type: ignore[arg-type]
    sources: dict[str, int] = {}
    for lab in mine:
        sources[lab.source] = sources.get(lab.source, 0) + 1
    digest = hashlib.sha256("".join(f"{lab.sop_uid}:{lab.label}:{lab.source}\n" for lab in mine).encode())
    meta = {
        "labels": len(mine),
        "labels_sha256": digest.hexdigest(),  # which labels this version was fitted on
        "policy_thresholds_before": {k: float(v) for k, v in vars(policy.thresholds).items()},
        "pneumonia": n_pos,
        "healthy": n_neg,
        "sources": sources,
        "operating_points": vars(ops),
        "fit": {k: None if v is None else round(v, 4) for k, v in after.items()},
        "before_on_same_labels": {k: None if v is None else round(v, 4) for k, v in before.items()},
        "ci95_bootstrap": {k: _ci(v) for k, v in boot.items()},
        "bootstrap": bootstrap,
        "seed": seed,
    }
    return SiteCalibration(0, model[0], model[1], a, b, thresholds, datetime.now(UTC).isoformat(), meta)
