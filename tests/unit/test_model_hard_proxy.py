"""The hard-normal shift proxy (services/inference/tools/hard_proxy.py): its pool, its hard normals,
its shift draws, its calibration fit, and a small sample of it run on the committed model (the
whole proxy: `pneumotriage model hard-proxy`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from services.core.calibration import expected_calibration_error, sigmoid
from services.inference.tools.evaluation import latest_version_dir
from services.inference.tools.hard_proxy import (
    HARDNESS_FILE,
    NORMAL_FRACTION,
    SHIFTS,
    hard_proxy_evaluate,
    hard_proxy_records,
    load_hardness,
    proxy_calibration,
    shift_of,
)
from services.inference.tools.training.sources import load_training_data
from services.inference.tools.training.split import SPLIT_FILE, assign, load_split

MODEL_DIR = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "model_repository" / "pneumonia"


def test_the_hardness_scores_cover_exactly_the_pool_and_come_from_a_weak_model(shared_data: Path) -> None:
    data = shared_data / "kermany224" / "train"
    parts = assign(load_training_data(data).records, load_split(SPLIT_FILE))
    pool = {r.name for r in parts["val"] + parts["test"]}
    report = json.loads(HARDNESS_FILE.read_text())
    assert set(report["scores"]) == pool
    assert 0.9 < report["weak_oof_auc"] < 1.0 and report["folds"] == 5


def test_the_proxy_keeps_every_pool_pneumonia_and_only_the_hardest_normals(shared_data: Path) -> None:
    data = shared_data / "kermany224" / "train"
    parts = assign(load_training_data(data).records, load_split(SPLIT_FILE))
    pool = parts["val"] + parts["test"]
    hardness = load_hardness()
    records = hard_proxy_records(data)
    chosen = {r.name for r in records}
    normals = [r for r in pool if r.label == 0]
    kept = [r for r in normals if r.name in chosen]
    left = [r for r in normals if r.name not in chosen]
    assert len(kept) == round(NORMAL_FRACTION * len(normals))
    assert min(hardness[r.name] for r in kept) >= max(hardness[r.name] for r in left)
    assert {r.name for r in pool if r.label == 1} <= chosen
    train_patients = {r.patient for r in parts["train"]}
    assert not {r.patient for r in records} & train_patients
    sample = hard_proxy_records(data, sample=40)
    assert len(sample) == 40 and 0 < sum(r.label == 0 for r in sample) < 40


def test_every_image_gets_a_deterministic_geometry_shift() -> None:
    picks = [shift_of(d, i) for d in range(3) for i in range(200)]
    assert picks == [shift_of(d, i) for d in range(3) for i in range(200)]
    assert {name for name, _ in picks} == set(SHIFTS)
    assert shift_of(0, 5) != shift_of(1, 5) or shift_of(0, 6) != shift_of(1, 6)


def test_weighted_ece_with_equal_weights_is_the_ece() -> None:
    rng = np.random.default_rng(1)
    probs = rng.random(500)
    labels = (rng.random(500) < probs).astype(float)
    weighted = expected_calibration_error(labels, probs, weights=np.ones(500))
    assert abs(weighted - expected_calibration_error(labels, probs)) < 1e-9


def test_the_proxy_calibration_recovers_a_known_scaling_at_the_prior() -> None:
    rng = np.random.default_rng(2)
    n = 4000
    z = rng.normal(0.0, 2.0, n)
    labels = (rng.random(n) < sigmoid(0.5 * z - 0.3)).astype(int)  # the truth: a = 0.5, b = -0.3
    report = {"labels": labels.tolist(), "logits": [z.tolist()], "patients": [f"p{i}" for i in range(n)]}
    cal = proxy_calibration(report, prior=float(labels.mean()))  # prior = prevalence: no shift
    assert abs(cal["platt_a"] - 0.5) < 0.06 and abs(cal["platt_b"] + 0.3) < 0.1
    assert cal["cross_fitted_ece_at_prior"] < 0.05
    shifted = proxy_calibration(report, prior=0.6)
    prevalence = labels.mean()
    expected = np.log(0.6 / 0.4) - np.log(prevalence / (1 - prevalence))
    assert abs(shifted["platt_b"] - cal["platt_b"] - expected) < 1e-9


def test_a_sample_of_the_proxy_runs_on_the_committed_model(shared_data: Path) -> None:
    version = latest_version_dir(MODEL_DIR)
    report = hard_proxy_evaluate(version, shared_data / "kermany224" / "train", sample=40, draws=1)
    m = report["metrics"]
    assert report["n_images"] == 40 and 0 < report["n_normal"] < 40
    for key in ("auc", "sensitivity", "specificity", "accuracy_at_prior", "ece_at_prior"):
        assert 0.0 <= m[key] <= 1.0, key
    assert 0.0 < report["chosen_threshold"] < 1.0
    assert np.asarray(report["logits"]).shape == (1, 40)


def test_the_committed_model_is_calibrated_and_sensitive_where_the_proxy_is_hard(shared_data: Path) -> None:
    """One draw over the whole proxy: the calibration target since v3 (v2 there: ECE 0.153)."""
    version = latest_version_dir(MODEL_DIR)
    report = hard_proxy_evaluate(version, shared_data / "kermany224" / "train", draws=1)
    m = report["metrics"]
    assert report["n_images"] > 1000 and report["n_normal"] > 50
    assert m["ece_at_prior"] < 0.08
    assert m["sensitivity"] >= 0.95
    assert m["auc"] > 0.97
