"""`pneumotriage triage calibrate`: learn the fusion weights and choose the triage thresholds from
labeled images for stated operating points, and report how they do on held-out images.

Input: JSON lines, one labeled image per line:

    {"id": "img-1", "group": "patient-7", "label": 1, "model_probability": 0.93,
     "votes": [{"answer": "pneumonia", "confidence": "sure", "trust": 0.86}, ...],
     "aggregate_p": 0.97}

(`label` 1 = pneumonia, 0 = healthy; `group` keeps a patient's images on one side of the split;
`votes`, `model_probability` and `aggregate_p` are each optional.)

Operating points (defaults): LIKELY_HEALTHY rule-out keeps sensitivity >= 0.95 (at most 5 % of
pneumonia images cleared), URGENT has PPV >= 0.90, PNEUMONIA_SUSPECTED (and above) PPV >= 0.85.
Thresholds are met on the data they are fitted on by construction; the held-out numbers say how
well they generalise.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from services.aggregator.flags import FLAGS, MEANS
from services.aggregator.fusion import Evidence, FusionWeights, Vote, feature_matrix, fit_weights
from services.aggregator.policy import Policy, Thresholds
from services.core.calibration import brier
from services.core.sensitivity_bound import allowed_misses


@dataclass(frozen=True)
class LabeledImage:
    id: str
    group: str
    label: int
    evidence: Evidence


@dataclass(frozen=True)
class OperatingPoints:
    rule_out_sensitivity: float = 0.95
    # > 0: the rule-out keeps rule_out_sensitivity with this confidence on new images, not only on
    # the labels it is fitted on (services/core/sensitivity_bound.py); `triage recalibrate` uses 0.8
    rule_out_confidence: float = 0.0
    urgent_ppv: float = 0.90
    suspected_ppv: float = 0.85
    min_flagged: int = 5  # never choose a threshold that flags fewer images than this


def parse_vote(v: dict[str, Any]) -> Vote:
    answer = str(v.get("answer", "")).lower().replace("answer_", "")
    answer = {"cant tell": "cant_tell", "can't tell": "cant_tell"}.get(answer, answer)
    return Vote(answer=answer, confidence=str(v.get("confidence", "sure")).lower(), trust=float(v.get("trust", 0.8)))


def load_jsonl(path: Path) -> list[LabeledImage]:
    out: list[LabeledImage] = []
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        row = json.loads(line)
        mp = row.get("model_probability")
        ap = row.get("aggregate_p")
        ev = Evidence(
            model_probability=None if mp is None else float(mp),
            votes=tuple(parse_vote(v) for v in row.get("votes", [])),
            aggregate_p=None if ap is None else float(ap),
        )
        ident = str(row.get("id", n))
        out.append(LabeledImage(ident, str(row.get("group", ident)), int(row["label"]), ev))
    return out


def split(images: Sequence[LabeledImage], held_out: float, seed: int) -> tuple[list[int], list[int]]:
    """Group-aware split: every image of a group (patient) lands on the same side."""
    from sklearn.model_selection import GroupShuffleSplit

    if held_out <= 0:
        return list(range(len(images))), []
    groups = [im.group for im in images]
    gss = GroupShuffleSplit(n_splits=1, test_size=held_out, random_state=seed)
    fit_idx, test_idx = next(gss.split(np.zeros(len(images)), groups=groups))
    return sorted(fit_idx.tolist()), sorted(test_idx.tolist())


def class_weights(y: np.ndarray, prevalence: float | None) -> np.ndarray:
    """Per-image weights that make the data look like a population with the given pneumonia
    prevalence (None: the data's own). PPV and NPV depend on prevalence; sensitivity does not."""
    if prevalence is None or len(y) == 0:
        return np.ones(len(y))
    observed = float(y.mean())
    if observed in (0.0, 1.0):
        return np.ones(len(y))
    return np.where(y == 1, prevalence / observed, (1 - prevalence) / (1 - observed))


def choose_thresholds(
    p: np.ndarray,
    y: np.ndarray,
    blocked: np.ndarray,
    ops: OperatingPoints,
    base: Thresholds,
    weights: np.ndarray | None = None,
) -> Thresholds:
    """Thresholds meeting the operating points on (p, y). The rule-out is chosen first (it is the
    safety-critical one); URGENT and PNEUMONIA_SUSPECTED only start above it.

    rule_out: the largest threshold (at most 0.5: never clear an image the fusion thinks more likely
    pneumonia than not) whose cleared set misses at most 1 - sensitivity of the pneumonia images
    (with `rule_out_confidence`: at most the misses that keep the sensitivity with that confidence);
    `blocked` marks images the conflict rule keeps out of LIKELY_HEALTHY whatever the threshold.
    urgent: the smallest threshold such that the URGENT group (P >= urgent), and every smaller such
    group, keeps PPV >= the urgent target. suspected: the same for the PNEUMONIA_SUSPECTED band
    [suspected, urgent) on its own (so the band is "pneumonia likely", not diluted by urgent cases).
    PPVs are weighted by `weights` (a stated prevalence).
    """
    w = np.ones(len(y)) if weights is None else weights
    candidates = np.unique(np.concatenate([p[p <= 0.5], [0.0]]))
    allowed = allowed_misses(int(y.sum()), ops.rule_out_sensitivity, ops.rule_out_confidence)
    rule_out = 0.0
    for t in candidates:
        cleared = (p <= t) & ~blocked
        missed = int((cleared & (y == 1)).sum())
        if missed <= allowed:
            rule_out = float(t)
        else:
            break

    order = np.argsort(-p, kind="stable")
    ps, ys, ws = p[order], y[order], w[order]
    tp, total = np.cumsum(ws * ys), np.cumsum(ws)

    def ppv_cut(first: int, target: float) -> tuple[float | None, int]:
        """Scanning down from index `first`: the lowest score whose group [first, i] — and every
        smaller such group — keeps PPV >= target. Returns (threshold or None, end index)."""
        best: float | None = None
        end = first
        base_tp = tp[first - 1] if first > 0 else 0.0
        base_n = total[first - 1] if first > 0 else 0.0
        for i in range(first, len(ps)):
            if i + 1 < len(ps) and ps[i + 1] == ps[i]:  # only cut between distinct scores
                continue
            n = total[i] - base_n
            if n <= 0 or (tp[i] - base_tp) / n < target:
                break
            if i + 1 - first >= ops.min_flagged:
                best, end = float(ps[i]), i + 1
        return best, end

    # The rule-out (safety) is chosen first; the pneumonia flags start above it.
    above = p[p > rule_out]
    floor = float(above.min()) if above.size else 1.0
    urgent_cut, _ = ppv_cut(0, ops.urgent_ppv)
    urgent = 1.0 if urgent_cut is None else max(urgent_cut, floor)
    first = int((ps >= urgent).sum())
    suspected_cut, _ = ppv_cut(first, ops.suspected_ppv)
    suspected = urgent if suspected_cut is None else min(max(suspected_cut, floor), urgent)
    return Thresholds(
        urgent=urgent,
        suspected=suspected,
        rule_out=rule_out,
        conflict_model_p=base.conflict_model_p,
        conflict_human_logodds=base.conflict_human_logodds,
    )


def flag_metrics(flags: Sequence[str], y: Sequence[int], weights: np.ndarray | None = None) -> dict[str, Any]:
    """Per flag: count, share of images, and the flag as a test for pneumonia.

    The flags that mean pneumonia in the registry (`flags.MEANS`: URGENT, PNEUMONIA_SUSPECTED) and
    "URGENT or SUSPECTED" (all of them) predict pneumonia; the one that means healthy (LIKELY_HEALTHY)
    predicts healthy, so for it "positive" means "not cleared" (sensitivity = the rule-out sensitivity,
    NPV = the share of cleared images that are truly healthy). UNCERTAIN and NOT_TRIAGED report
    their share and pneumonia rate. With `weights` (a target prevalence), shares, PPV and NPV are
    those of a population with that prevalence; counts stay raw.
    """
    f = np.asarray(flags)
    yy = np.asarray(y, dtype=int)
    w = np.ones(len(yy)) if weights is None else np.asarray(weights, dtype=float)
    n = len(yy)
    total = float(w.sum()) or 1.0

    def table(test_pos: np.ndarray) -> dict[str, float | None]:
        tp = float(w[test_pos & (yy == 1)].sum())
        fp = float(w[test_pos & (yy == 0)].sum())
        fn = float(w[~test_pos & (yy == 1)].sum())
        tn = float(w[~test_pos & (yy == 0)].sum())

        def r(a: float, b: float) -> float | None:
            return round(a / (a + b), 4) if a + b > 0 else None

        return {"sensitivity": r(tp, fn), "specificity": r(tn, fp), "ppv": r(tp, fp), "npv": r(tn, fn)}

    prevalence = round(float(w[yy == 1].sum()) / total, 4) if n else None
    out: dict[str, Any] = {"images": n, "prevalence": prevalence, "flags": {}}
    for flag in FLAGS:
        mask = f == flag
        entry: dict[str, Any] = {"count": int(mask.sum()), "share": round(float(w[mask].sum()) / total, 4)}
        if MEANS.get(flag) == "pneumonia":
            entry.update(table(mask))
        elif MEANS.get(flag) == "healthy":
            entry.update(table(~mask))
        elif mask.any():
            entry["pneumonia_rate"] = round(float(w[mask & (yy == 1)].sum()) / float(w[mask].sum()), 4)
        out["flags"][flag] = entry
    either = np.isin(f, [flag for flag in FLAGS if MEANS.get(flag) == "pneumonia"])
    out["flags"]["URGENT_OR_SUSPECTED"] = {  # every flag that means pneumonia (the name the results use)
        "count": int(either.sum()),
        "share": round(float(w[either].sum()) / total, 4),
        **table(either),
    }
    return out


def score_metrics(p: np.ndarray, y: np.ndarray) -> dict[str, float | None]:
    from sklearn.metrics import roc_auc_score

    if len(set(y.tolist())) < 2:
        return {"auc": None, "brier": None, "accuracy_at_0.5": None}
    return {
        "auc": round(float(roc_auc_score(y, p)), 4),
        "brier": round(brier(y, p), 4),
        "accuracy_at_0.5": round(float(((p >= 0.5) == (y == 1)).mean()), 4),
    }


def evaluate(policy: Policy, images: Sequence[LabeledImage], prevalence: float | None = None) -> dict[str, Any]:
    y = np.array([im.label for im in images], dtype=int)
    results = [policy.classify(im.evidence) for im in images]
    p = np.array([r[1] if r[1] is not None else 0.5 for r in results])
    report = flag_metrics([r[0] for r in results], y, class_weights(y, prevalence))
    report["score"] = score_metrics(p, y)
    return report


@dataclass
class Calibration:
    policy: Policy
    fit_report: dict[str, Any]
    held_out_report: dict[str, Any] | None


def calibrate(
    images: Sequence[LabeledImage],
    ops: OperatingPoints | None = None,
    held_out: float = 0.3,
    seed: int = 0,
    base: Thresholds | None = None,
    fusion: FusionWeights | None = None,
    prevalence: float | None = None,
) -> Calibration:
    """Fit weights (unless `fusion` is given) and thresholds on a split; evaluate both sides."""
    ops = ops or OperatingPoints()
    base = base or Thresholds()
    fit_idx, test_idx = split(images, held_out, seed)
    fit = [images[i] for i in fit_idx]
    test = [images[i] for i in test_idx]
    y_fit = np.array([im.label for im in fit], dtype=int)
    if len(set(y_fit.tolist())) < 2:
        raise ValueError("calibration data needs both pneumonia and healthy images on the fit side")
    w_fit = class_weights(y_fit, prevalence)
    if fusion is None:
        fusion = fit_weights(feature_matrix(im.evidence for im in fit), y_fit, sample_weight=w_fit)
    draft = Policy(fusion, base)
    p_fit = np.array([fusion.posterior(im.evidence) for im in fit])
    blocked = np.array([bool(draft.rule_out_blockers(im.evidence)) for im in fit])
    thresholds = choose_thresholds(p_fit, y_fit, blocked, ops, base, w_fit)
    policy = Policy(fusion, thresholds)
    fit_report = evaluate(policy, fit, prevalence)
    held_report = evaluate(policy, test, prevalence) if test else None
    policy.meta = {
        "operating_points": vars(ops),
        "prevalence": prevalence if prevalence is not None else "as in the data",
        "fit_images": len(fit),
        "held_out_images": len(test),
        "seed": seed,
        "fit": fit_report,
        **({"held_out": held_report} if held_report else {}),
    }
    return Calibration(policy, fit_report, held_report)
