"""The site loop's evidence (issue 28), without PyTorch: the locked site test set, the paired
comparison of two versions on the same images, and the promotion rule.

Locked site test set: carved out of a site's labelled images before anything is trained on them,
stratified by class at patient level, stored under <PT_DATA_DIR>/model-staging/sites/<site>/locked.json
(and copied into every candidate of that site), and reused for every later candidate: an image whose
sha256 or patient is in it is never trained on.

Promotion rule (docs/model-card.md#site-adaptation): on the locked set, paired bootstrap over
patients (both versions scored on the same resample), each version at its own operating threshold:
  - non-inferior in sensitivity: the lower 95 % bound of (sens_candidate - sens_active) > -margin
    (margin 0.05), and
  - better in AUC or specificity: the lower 95 % bound of (AUC_candidate - AUC_active) > 0, or of
    (spec_candidate - spec_active) > 0.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from services.core.calibration import expected_calibration_error, reliability_bins, threshold_metrics
from services.inference.tools.training.dataset import ImageRecord

LOCKED_FILE = "locked.json"
SENSITIVITY_MARGIN = 0.05


def sites_dir() -> Path:
    from services.core.settings import CommonSettings

    return CommonSettings().data_dir / "model-staging" / "sites"


def carve_locked(records: list[ImageRecord], fraction: float, seed: int) -> dict:
    """A stratified (by class), patient-level test set of about `fraction` of the patients."""
    patients: dict[int, set[str]] = defaultdict(set)
    for r in records:
        patients[r.label].add(r.patient)
    rng = np.random.default_rng(seed)
    locked: set[str] = set()
    for label in sorted(patients):
        ids = sorted(patients[label] - locked)
        n = max(1, round(len(ids) * fraction))
        locked.update(ids[i] for i in rng.permutation(len(ids))[:n])
    return locked_entry([r for r in records if r.patient in locked], fraction, seed)


def locked_entry(records: list[ImageRecord], fraction: float, seed: int) -> dict:
    return {
        "rule": "stratified by class at patient level: numpy default_rng(seed).permutation of the sorted patient"
        " ids per class, the first round(fraction * n) locked; never trained on, reused for every later candidate",
        "fraction": fraction,
        "seed": seed,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "patients": sorted({r.patient for r in records}),
        "images": [
            {"path": str(r.path.resolve()), "sha256": r.sha256, "label": r.label, "patient": r.patient}
            for r in sorted(records, key=lambda r: r.sha256)
        ],
        "counts": {"NORMAL": sum(r.label == 0 for r in records), "PNEUMONIA": sum(r.label == 1 for r in records)},
    }


def load_or_carve(site: str, records: list[ImageRecord], fraction: float, seed: int) -> tuple[dict, bool]:
    """The site's locked set (reused when it exists); returns (locked, created)."""
    path = sites_dir() / site / LOCKED_FILE
    if path.exists():
        return json.loads(path.read_text()), False
    locked = carve_locked(records, fraction, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(locked, indent=1) + "\n")
    return locked, True


def split_locked(locked: dict, records: list[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(training pool, locked images present here): nothing of a locked patient or image is trained on."""
    shas = {i["sha256"] for i in locked["images"]}
    patients = set(locked["patients"])
    pool = [r for r in records if r.sha256 not in shas and r.patient not in patients]
    return pool, [r for r in records if r.sha256 in shas]


def locked_records(locked: dict) -> list[ImageRecord]:
    """The locked images as records (each file must still be there, with the same bytes)."""
    out = []
    for i in locked["images"]:
        path = Path(i["path"])
        if not path.is_file():
            raise FileNotFoundError(f"locked test image {path} is missing")
        if hashlib.sha256(path.read_bytes()).hexdigest() != i["sha256"]:
            raise ValueError(f"locked test image {path} changed since the locked set was carved")
        out.append(ImageRecord(path, int(i["label"]), str(i["patient"]), str(i["sha256"])))
    return out


# ------------------------------------------------------------------------------------ comparison
def _auc(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def _rates(y: np.ndarray, p: np.ndarray, t: float) -> tuple[float, float]:
    m = threshold_metrics(y, p, t)
    return m["sensitivity"], m["specificity"]


@dataclass
class Scored:
    """One version's calibrated probabilities on a set of images, and its operating threshold."""

    version: str
    probs: np.ndarray
    threshold: float


def version_metrics(y: np.ndarray, s: Scored) -> dict:
    sens, spec = _rates(y, s.probs, s.threshold)
    return {
        "version": s.version,
        "threshold": s.threshold,
        "auc": _auc(y, s.probs),
        "sensitivity": sens,
        "specificity": spec,
        "ece": expected_calibration_error(y, s.probs),
    }


def _ci(values: list[float]) -> list[float]:
    v = np.asarray(values, dtype=np.float64)
    v = v[np.isfinite(v)]
    return [float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))] if len(v) else [float("nan")] * 2


def paired_comparison(
    labels: np.ndarray, groups: list[str], candidate: Scored, reference: Scored, n: int = 1000, seed: int = 0
) -> dict:
    """Both versions on the same images: each one's metrics with 95 % CIs, and the paired differences
    (candidate - reference) with percentile CIs from one bootstrap over patients for both."""
    y = np.asarray(labels).astype(int)
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    members = [np.array(v) for v in by_group.values()]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(n):
        idx = np.concatenate([members[j] for j in rng.integers(0, len(members), len(members))])
        yy = y[idx]
        for name, s in (("candidate", candidate), ("reference", reference)):
            sens, spec = _rates(yy, s.probs[idx], s.threshold)
            samples[f"{name}.auc"].append(_auc(yy, s.probs[idx]))
            samples[f"{name}.sensitivity"].append(sens)
            samples[f"{name}.specificity"].append(spec)
        for k in ("auc", "sensitivity", "specificity"):
            samples[f"diff.{k}"].append(samples[f"candidate.{k}"][-1] - samples[f"reference.{k}"][-1])
    out: dict = {"n_images": len(y), "n_patients": len(members), "n_pneumonia": int(y.sum()), "bootstrap": n}
    for name, s in (("candidate", candidate), ("reference", reference)):
        m = version_metrics(y, s)
        for k in ("auc", "sensitivity", "specificity"):
            m[f"{k}_ci95"] = _ci(samples[f"{name}.{k}"])
        out[name] = m
    out["difference"] = {
        k: {"value": out["candidate"][k] - out["reference"][k], "ci95": _ci(samples[f"diff.{k}"])}
        for k in ("auc", "sensitivity", "specificity")
    }
    agree = (candidate.probs >= candidate.threshold) == (reference.probs >= reference.threshold)
    out["agreement"] = float(np.mean(agree)) if len(agree) else float("nan")
    out["curves"] = {name: curves(y, s) for name, s in (("candidate", candidate), ("reference", reference))}
    return out


def curves(labels: np.ndarray, s: Scored, max_points: int = 60, bins: int = 10) -> dict:
    """What the ML page plots: the ROC curve (at most `max_points` (fpr, tpr) points, ends kept), the
    operating point at the version's threshold, and a reliability diagram (`bins` equal-width bins
    of the predicted probability: mean predicted, observed pneumonia rate, images)."""
    from sklearn.metrics import roc_curve

    y = np.asarray(labels).astype(int)
    p = np.asarray(s.probs, dtype=np.float64)
    out: dict = {"roc": [], "operating_point": None, "reliability": []}
    if len(np.unique(y)) == 2:
        fpr, tpr, _ = roc_curve(y, p)
        keep = np.unique(np.round(np.linspace(0, len(fpr) - 1, min(max_points, len(fpr)))).astype(int))
        out["roc"] = [[round(float(fpr[i]), 4), round(float(tpr[i]), 4)] for i in keep]
        sens, spec = _rates(y, p, s.threshold)
        out["operating_point"] = [round(1.0 - spec, 4), round(sens, 4)]
    for mean_p, observed, n in reliability_bins(y, p, bins):
        out["reliability"].append([round(mean_p, 4), round(observed, 4), n])
    return out


def promotion_verdict(comparison: dict, margin: float = SENSITIVITY_MARGIN) -> dict:
    """The documented rule (module docstring) applied to a paired comparison on the locked set."""
    d = comparison["difference"]
    sens_ok = d["sensitivity"]["ci95"][0] > -margin
    auc_better = d["auc"]["ci95"][0] > 0
    spec_better = d["specificity"]["ci95"][0] > 0
    reasons = []
    if not sens_ok:
        reasons.append(
            f"sensitivity not non-inferior: lower 95% bound of the difference {d['sensitivity']['ci95'][0]:+.3f}"
            f" <= -{margin}"
        )
    if not (auc_better or spec_better):
        reasons.append(
            f"neither AUC nor specificity better: lower 95% bounds {d['auc']['ci95'][0]:+.4f} (AUC),"
            f" {d['specificity']['ci95'][0]:+.3f} (specificity) not > 0"
        )
    return {
        "passed": sens_ok and (auc_better or spec_better),
        "sensitivity_non_inferior": sens_ok,
        "auc_better": auc_better,
        "specificity_better": spec_better,
        "margin": margin,
        "reasons": reasons,
        "rule": "lower 95% bound of sens(candidate)-sens(active) > -margin AND (lower bound of the AUC difference"
        " > 0 OR lower bound of the specificity difference > 0); paired patient bootstrap on the locked site set",
    }


def score(version_dir: Path, records: list[ImageRecord]) -> Scored:
    from services.inference.tools.evaluation import load_metadata, predict

    meta = load_metadata(version_dir)
    _, probs, _ = predict(version_dir, [r.path for r in records])
    return Scored(str(meta.get("version", version_dir.name)), np.asarray(probs), float(meta["thresholds"]["operating"]))
