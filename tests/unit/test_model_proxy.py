"""Proxy external validation (services/inference/tools/proxy.py): the held-out acquisition batches, the
stress transforms through the service's own DICOM decoding, and a small sample of the suite run on
the committed model (the full suite: `pneumotriage model proxy-eval`)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from services.core.imaging import display_array
from services.inference.tools.evaluation import latest_version_dir, load_metadata
from services.inference.tools.proxy import (
    STRESSES,
    dicom_from_display,
    external_records,
    is_external,
    proxy_evaluate,
    stressed_input,
)
from services.inference.tools.training.dataset import deduplicate, scan_folder

MODEL_DIR = Path(__file__).resolve().parents[2] / "deploy" / "triton" / "model_repository" / "pneumonia"


def test_external_families_are_whole_id_ranges() -> None:
    assert is_external("IM-0115-0001.jpeg") and is_external("IM-0299-0001-0002.jpeg")
    assert not is_external("IM-0300-0001.jpeg")
    assert is_external("NORMAL2-IM-0599-0001.jpeg") and not is_external("NORMAL2-IM-0600-0001.jpeg")
    assert is_external("person1_bacteria_1.jpeg") and is_external("person199_virus_343.jpeg")
    assert not is_external("person200_bacteria_1.jpeg") and not is_external("other.png")


def test_held_out_batches_hold_both_classes_near_the_official_prevalence(shared_data: Path) -> None:
    data = shared_data / "kermany224" / "train"
    records = external_records(data)
    kept, _ = deduplicate(scan_folder(data))
    labels = np.array([r.label for r in records])
    assert 0.1 < len(records) / len(kept) < 0.2  # a proxy, not most of the training data
    assert 0.55 < labels.mean() < 0.65
    # whole patients: no patient has images both inside and outside the batches
    inside = {r.patient for r in records}
    assert not inside & {r.patient for r in kept if not is_external(r.name)}
    sample = external_records(data, sample=40)
    assert len(sample) == 40 and 0 < sum(r.label for r in sample) < 40


def test_dicom_stresses_decode_back_to_the_display_image() -> None:
    rng = np.random.default_rng(3)
    gray = rng.random((64, 80)).astype(np.float32)
    m2 = display_array(dicom_from_display(gray, bits=12, window=False))
    m1 = display_array(dicom_from_display(gray, bits=12, monochrome1=True, window=False))
    assert np.abs(m2 - m1).max() < 1e-3  # MONOCHROME1 is inverted back by the service's decoder
    assert np.corrcoef(m2.ravel(), gray.ravel())[0, 1] > 0.999
    for name in STRESSES:
        x = stressed_input(gray, name, seed=1, size=48)
        assert x.shape == (1, 48, 48) and np.isfinite(x).all(), name
    clean = stressed_input(gray, "clean", seed=1, size=48)
    assert not np.allclose(clean, stressed_input(gray, "zoom_out_0.15", seed=1, size=48))


def test_proxy_sample_on_the_committed_model(shared_data: Path) -> None:
    """The CI sample: 60 held-out images, clean + three shifts, through the newest committed model."""
    vdir = latest_version_dir(MODEL_DIR)
    stresses = ["clean", "gamma_1.6", "zoom_out_0.15", "dicom_12bit_monochrome1"]
    report = proxy_evaluate(vdir, shared_data / "kermany224" / "train", sample=60, stresses=stresses)
    json.dumps(report)  # the CLI writes it as JSON
    assert report["n_images"] == 60 and report["model_version"] == load_metadata(vdir)["version"]
    assert set(stresses) <= set(report["conditions"])
    for name in stresses:
        m = report["conditions"][name]
        assert m["n"] == 60 and 0.0 <= m["specificity_at_sens95"] <= 1.0
    assert report["conditions"]["clean"]["auc"] > 0.9
    worst = report["worst_case"]["auc"]
    assert worst["condition"] in stresses[1:]
    assert worst["value"] == min(report["conditions"][s]["auc"] for s in stresses[1:])
