"""The hard-normal shift proxy: a stand-in for an unseen hospital's test set that reproduces what the
official test split showed (issue #30), where the held-out batches of proxy.py did not.

What the kept official split showed: its pneumonias are easy, but its normals score high (model v2:
median P(pneumonia) 0.27, a quarter above 0.75), so v1 and v2 lost a third of their specificity there
(0.594 and 0.633) while their proxy and internal figures said 0.93-0.99. Its pixel statistics match
the training folder, so it is not an exposure shift. This proxy builds such a set from images no
model version trains on:

- **pool**: the internal validation and test splits (split.json), unseen by the training of v1, v2
  and v3 (v1 and v2 fitted their calibration on the validation part, v3 too);
- **hard normals**: an independent weak model (logistic regression on 24 x 24 standardised pixels,
  out-of-fold over 5 patient folds of the whole training folder; ``fit_hardness``) scores every
  image; only the hardest ``NORMAL_FRACTION`` of the pool's normals (highest out-of-fold P(pneumonia):
  the normals that look most like pneumonia) are kept, with every pool pneumonia;
- **geometry shifts**: each image is shown under one shift drawn from ``SHIFTS`` (tighter crop,
  collimation border, true aspect, full resolution, rotation, a 12-bit DICOM through the service's
  decoder), ``DRAWS`` independent draws; figures are the mean over draws.

The two choices (normal fraction 0.20, the geometry family) were made among 18 variants (3 shift
families x 6 fractions) so that v1 and v2 show their kept-split behaviour: specificity at their own
thresholds within ~0.1, and v1's AUC below v2's. That makes it calibrated on two published numbers,
not independent evidence; v3's figures on it are a prediction that the kept split checks.

Accuracy and ECE depend on prevalence: the proxy is 93 % pneumonia, so they are reported with the
normals re-weighted to ``PRIOR`` (the calibration prior of the model card, near the official split's
62.5 %). AUC, sensitivity and specificity do not depend on it.

    pneumotriage model hard-proxy --model-dir .../pneumonia/1 --model-dir .../pneumonia/2
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

from services.core.calibration import (
    expected_calibration_error,
    fit_platt,
    logit,
    sigmoid,
    specificity_at_sensitivity,
)
from services.inference.tools.evaluation import calibrate, load_metadata, read_display_image
from services.inference.tools.progress import tracked
from services.inference.tools.proxy import stratified_sample, stressed_input
from services.inference.tools.training.dataset import ImageRecord
from services.inference.tools.training.sources import load_training_data
from services.inference.tools.training.split import SPLIT_FILE, assign, load_split

if TYPE_CHECKING:
    from rich.progress import Progress

HARDNESS_FILE = Path(__file__).with_name("hard_proxy_hardness.json")
NORMAL_FRACTION = 0.20
SHIFTS: tuple[str, ...] = (
    "crop_0.85",
    "zoom_out_0.15",
    "true_aspect_1.25",
    "full_res_1024x1280",
    "rotate_+10",
    "rotate_-10",
    "dicom_12bit_windowed",
)
DRAWS = 5
PRIOR = 0.6
SENSITIVITY_TARGET = 0.97  # operating threshold chosen here: the highest keeping this mean sensitivity
WEAK_SIZE = 24
# the official test split (624 images), measured by the project owner (issue #30): what this proxy
# has to reproduce for the committed versions
KEPT_SPLIT: dict[int, dict[str, float]] = {
    1: {"threshold": 0.766, "auc": 0.957, "sensitivity": 0.987, "specificity": 0.594, "ece": 0.209},
    2: {"threshold": 0.541, "auc": 0.970, "sensitivity": 0.990, "specificity": 0.633, "ece": 0.131},
}


# ------------------------------------------------------------------------------------------ hardness
def weak_features(path: Path) -> np.ndarray:
    gray = Image.open(path).convert("L").resize((WEAK_SIZE, WEAK_SIZE), Image.Resampling.BILINEAR)
    x = np.asarray(gray, dtype=np.float32)
    return ((x - x.mean()) / (x.std() + 1e-3)).ravel()


def fit_hardness(data: Path, folds: int = 5, seed: int = 0, progress: Progress | None = None) -> dict:
    """Out-of-fold P(pneumonia) of a weak pixel model for every image of ``data`` (patient folds):
    no image is scored by a model that saw its patient. Returns the report written to HARDNESS_FILE
    (scores of the pool only: the validation and test splits)."""
    records = load_training_data(Path(data)).records
    x = np.stack([weak_features(r.path) for r in tracked(progress, records, "weak model: features")])
    y = np.array([r.label for r in records])
    patients = sorted({r.patient for r in records})
    fold_of = dict(zip(patients, np.random.default_rng(seed).integers(0, folds, len(patients)), strict=True))
    fold = np.array([fold_of[r.patient] for r in records])
    oof = np.zeros(len(records))
    for k in tracked(progress, range(folds), "weak model: folds"):
        weak = LogisticRegression(C=0.05, max_iter=2000, class_weight="balanced")
        weak.fit(x[fold != k], y[fold != k])
        oof[fold == k] = weak.predict_proba(x[fold == k])[:, 1]
    pool = {r.name for part in ("val", "test") for r in assign(records, load_split(SPLIT_FILE))[part]}
    return {
        "model": f"logistic regression (C=0.05, balanced) on {WEAK_SIZE}x{WEAK_SIZE} standardised pixels",
        "folds": folds,
        "seed": seed,
        "weak_oof_auc": float(roc_auc_score(y, oof)),
        "scores": {r.name: round(float(s), 5) for r, s in zip(records, oof, strict=True) if r.name in pool},
    }


def load_hardness(path: Path = HARDNESS_FILE) -> dict[str, float]:
    return json.loads(Path(path).read_text())["scores"]


# --------------------------------------------------------------------------------------------- the set
def hard_proxy_records(
    data: Path,
    hardness: dict[str, float] | None = None,
    fraction: float = NORMAL_FRACTION,
    sample: int | None = None,
    seed: int = 0,
) -> list[ImageRecord]:
    """Every pneumonia of the pool and its hardest ``fraction`` of normals; ``sample``: a class-
    stratified random subset of that set (the suite's small run)."""
    hardness = load_hardness() if hardness is None else hardness
    parts = assign(load_training_data(Path(data)).records, load_split(SPLIT_FILE))
    pool = parts["val"] + parts["test"]
    missing = [r.name for r in pool if r.name not in hardness]
    if missing:
        raise ValueError(f"{len(missing)} pool images have no hardness score (e.g. {missing[0]}): re-fit it")
    normals = sorted((r for r in pool if r.label == 0), key=lambda r: (-hardness[r.name], r.name))
    chosen = normals[: round(fraction * len(normals))] + [r for r in pool if r.label == 1]
    return sorted(stratified_sample(chosen, sample, seed), key=lambda r: (r.label, r.name))


def shift_of(draw: int, index: int, seed: int = 0) -> tuple[str, int]:
    """The shift (and its own seed) image ``index`` gets in ``draw``: deterministic."""
    rng = np.random.default_rng([seed, draw, index])
    return SHIFTS[int(rng.integers(len(SHIFTS)))], int(rng.integers(2**31))


def shifted_logits(
    version_dir: Path,
    images: list[np.ndarray],
    draws: int = DRAWS,
    seed: int = 0,
    batch_size: int = 32,
    progress: Progress | None = None,
) -> np.ndarray:
    """[draws, n] raw logits of the exported model, each image under its drawn shift."""
    size = int(load_metadata(version_dir)["input_size"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(Path(version_dir) / "model.onnx"), options, providers=["CPUExecutionProvider"])
    out = np.zeros((draws, len(images)))
    for d in range(draws):
        for start in tracked(progress, range(0, len(images), batch_size), f"{Path(version_dir).name}: draw {d + 1}"):
            stop = min(start + batch_size, len(images))
            batch = [stressed_input(images[i], *shift_of(d, i, seed), size) for i in range(start, stop)]
            out[d, start:stop] = session.run(["logit"], {"image": np.stack(batch).astype(np.float32)})[0]
    return out


# ---------------------------------------------------------------------------------------------- metrics
def prior_weights(labels: np.ndarray, prior: float = PRIOR) -> np.ndarray:
    """Per-image weights that make the weighted pneumonia share ``prior``."""
    y = np.asarray(labels).astype(bool)
    return np.where(y, prior / max(y.sum(), 1), (1 - prior) / max((~y).sum(), 1))


def draw_metrics(labels: np.ndarray, probs: np.ndarray, logits: np.ndarray, threshold: float) -> dict:
    y = np.asarray(labels).astype(bool)
    w = prior_weights(y)
    flagged = probs >= threshold
    sens, spec = float(flagged[y].mean()), float((~flagged[~y]).mean())
    return {
        "auc": float(roc_auc_score(y, logits)),
        "sensitivity": sens,
        "specificity": spec,
        "accuracy_at_prior": PRIOR * sens + (1 - PRIOR) * spec,
        "specificity_at_sens95": specificity_at_sensitivity(y, logits, 0.95),
        "ece_at_prior": expected_calibration_error(y, probs, weights=w),
        "normal_p_quantiles": [float(q) for q in np.quantile(probs[~y], [0.5, 0.75, 0.9])],
        "pneumonia_p10": float(np.quantile(probs[y], 0.1)),
    }


def summarise(per_draw: list[dict]) -> dict:
    keys = [k for k in per_draw[0] if not isinstance(per_draw[0][k], list)]
    out = {k: float(np.mean([d[k] for d in per_draw])) for k in keys}
    out["spread"] = {k: float(np.std([d[k] for d in per_draw])) for k in keys}
    out["normal_p_quantiles"] = np.mean([d["normal_p_quantiles"] for d in per_draw], axis=0).tolist()
    return out


def threshold_for_mean_sensitivity(labels: np.ndarray, probs: np.ndarray, target: float = SENSITIVITY_TARGET) -> float:
    """The highest threshold whose sensitivity, averaged over the draws ([draws, n] probs), is at
    least ``target``."""
    y = np.asarray(labels).astype(bool)
    candidates = np.unique(probs[:, y])[::-1]
    for t in candidates:
        if np.mean([(p[y] >= t).mean() for p in probs]) >= target:
            return float(t)
    return float(candidates[-1])


def hard_proxy_evaluate(
    version_dir: Path,
    data: Path,
    sample: int | None = None,
    draws: int = DRAWS,
    seed: int = 0,
    threshold: float | None = None,
    progress: Progress | None = None,
) -> dict:
    """The hard-normal shift proxy report of one exported version at ``threshold`` (default: its
    metadata's operating threshold), with the threshold this proxy would choose."""
    metadata = load_metadata(version_dir)
    records = hard_proxy_records(data, sample=sample, seed=seed)
    labels = np.array([r.label for r in records])
    images = [read_display_image(r.path) for r in tracked(progress, records, f"{Path(version_dir).name}: read")]
    logits = shifted_logits(version_dir, images, draws, seed, progress=progress)
    report = {
        "proxy": "hard-normal shift proxy (services/inference/tools/hard_proxy.py)",
        "model_version": int(metadata.get("version", Path(version_dir).name)),
        "n_images": len(records),
        "n_normal": int((labels == 0).sum()),
        "normal_fraction": NORMAL_FRACTION,
        "draws": draws,
        "shifts": list(SHIFTS),
        "prior": PRIOR,
        "patients": [r.patient for r in records],
        "labels": labels.tolist(),
        "logits": logits.round(5).tolist(),
    }
    return score(report, metadata, threshold)


def score(report: dict, metadata: dict, threshold: float | None = None) -> dict:
    """The report's metrics from its logits under ``metadata``'s calibration, at ``threshold``
    (default: the operating threshold there), and the threshold this proxy would choose."""
    labels = np.asarray(report["labels"])
    logits = np.asarray(report["logits"], dtype=float)
    probs = np.stack([calibrate(z, metadata) for z in logits])
    at = float(metadata["thresholds"]["operating"]) if threshold is None else float(threshold)
    version = report["model_version"]
    return report | {
        "threshold": at,
        "metrics": summarise([draw_metrics(labels, p, z, at) for p, z in zip(probs, logits, strict=True)]),
        "chosen_threshold": threshold_for_mean_sensitivity(labels, probs),
        "kept_split": KEPT_SPLIT.get(version),
    }


# ---------------------------------------------------------------------------------------- calibration
def proxy_calibration(report: dict, prior: float = PRIOR) -> dict:
    """Platt scaling of the served logit fitted on this proxy (all draws), its offset moved from the
    proxy's prevalence to ``prior`` exactly as training does for the validation split; with the ECE
    at ``prior`` of a cross-fitted version (fitted on one half of the patients, measured on the
    other) so the gain is not only measured where it was fitted."""
    y = np.asarray(report["labels"], dtype=float)
    z = np.asarray(report["logits"], dtype=float)
    patients = np.asarray(report["patients"])

    def fit(mask: np.ndarray) -> tuple[float, float, float]:
        a, b = fit_platt(z[:, mask].ravel(), np.tile(y[mask], len(z)))
        prevalence = float(np.clip(y[mask].mean(), 0.01, 0.99))
        return a, b + float(logit(prior) - logit(prevalence)), prevalence

    a, b, prevalence = fit(np.ones(len(y), bool))
    half = np.array([int(hashlib.sha256(p.encode()).hexdigest(), 16) % 2 for p in patients])
    eces = []
    for k in (0, 1):
        ak, bk, _ = fit(half != k)
        test = half == k
        eces += [
            expected_calibration_error(y[test], sigmoid(ak * zd[test] + bk), weights=prior_weights(y[test], prior))
            for zd in z
        ]
    return {
        "method": "temperature",
        "fitted_on": "hard-normal shift proxy (services/inference/tools/hard_proxy.py)",
        "platt_a": a,
        "platt_b": b,
        "temperature": 1.0 / a,
        "bias_shift": b / a,
        "prior": prior,
        "proxy_prevalence": prevalence,
        "cross_fitted_ece_at_prior": float(np.mean(eces)),
    }
