"""The committed model version, run with onnxruntime: held-out performance, calibration, the ONNX
graph against its metadata and config.pbtxt, and robustness to how the same image is encoded."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pydicom
import pytest

from services.inference.preprocess import load_image_file, preprocess_dicom, preprocess_image_file
from services.inference.tools.evaluation import calibrate, evaluate_folder, latest_version_dir, load_metadata
from services.inference.tools.training.split import SPLIT_FILE, load_split
from tests.support.model_dicom import make_dicom

REPO_ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = REPO_ROOT / "deploy" / "triton" / "model_repository" / "pneumonia"


@pytest.fixture(scope="module")
def version_dir() -> Path:
    return latest_version_dir(MODEL_DIR)


@pytest.fixture(scope="module")
def metadata(version_dir: Path) -> dict:
    return load_metadata(version_dir)


@pytest.fixture(scope="module")
def session(version_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(version_dir / "model.onnx"), providers=["CPUExecutionProvider"])


def probability(session: ort.InferenceSession, metadata: dict, tensors: list[np.ndarray]) -> np.ndarray:
    logits = session.run(["logit"], {"image": np.stack(tensors).astype(np.float32)})[0]
    return calibrate(logits, metadata)


@pytest.fixture(scope="module")
def heldout_report(shared_data: Path, version_dir: Path) -> dict:
    return evaluate_folder(shared_data / "kermany224" / "train", version_dir, split="test", bootstrap=0)


def test_heldout_patients_auc_floor(heldout_report: dict) -> None:
    """AUC >= 0.95 on the patient-level held-out split (a regression floor, not the goal)."""
    split = load_split(SPLIT_FILE)
    assert heldout_report["n_images"] == split["counts"]["test"]["images"]
    assert heldout_report["metrics"]["auc"]["value"] >= 0.95


def test_heldout_probabilities_are_calibrated(heldout_report: dict) -> None:
    """Since v3 the probability is calibrated on the hard-normal shift proxy (the one that reproduced
    the official split's ECE for v1 and v2; its own check: tests/unit/test_model_hard_proxy.py), not on
    this easy internal split: here it is a regression bound (v3: ECE 0.106, Brier 0.057)."""
    m = heldout_report["metrics"]
    assert m["ece"]["value"] < 0.12
    assert m["brier"]["value"] < 0.08
    # the operating threshold chosen on validation keeps both error rates sensible on unseen patients
    assert m["operating"]["sensitivity"]["value"] > 0.85
    assert m["operating"]["specificity"]["value"] > 0.8


def test_onnx_graph_matches_the_interface_and_metadata(session: ort.InferenceSession, metadata: dict) -> None:
    s = metadata["input_size"]
    (inp,) = session.get_inputs()
    assert inp.name == "image" and inp.type == "tensor(float)" and inp.shape[1:] == [1, s, s]
    assert not isinstance(inp.shape[0], int), "batch dimension must be dynamic"
    outputs = {o.name: o for o in session.get_outputs()}
    assert set(outputs) == {"logit", "cam"}
    rng = np.random.default_rng(0)
    for n in (1, 3):
        logit, cam = session.run(["logit", "cam"], {"image": rng.normal(size=(n, 1, s, s)).astype(np.float32)})
        assert logit.shape == (n,) and cam.shape == (n, *metadata["outputs"]["cam"][1:])
        np.testing.assert_allclose(cam.mean(axis=(1, 2)), logit, atol=1e-4)  # GAP + linear head
    assert metadata["onnx_check"]["max_abs_diff_logit"] < 1e-4
    assert metadata["opset"] >= 17


def test_metadata_calibration_thresholds_and_provenance(version_dir: Path, metadata: dict) -> None:
    assert metadata["name"] == "pneumonia" and metadata["version"] == version_dir.name
    cal = metadata["calibration"]
    assert cal["method"] == "temperature" and 0.05 < cal["temperature"] < 20
    t = metadata["thresholds"]
    assert 0 < t["rule_out"] <= t["operating"] <= t["urgent"] < 1
    assert metadata["data_sha256"] == load_split(SPLIT_FILE)["data_sha256"]
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", metadata["git_commit"])
    assert (version_dir / "model.onnx").stat().st_size < 50 * 1024 * 1024
    for key in ("trained_at", "train_seconds", "metrics"):
        assert key in metadata


def test_config_pbtxt_agrees_with_the_model(metadata: dict) -> None:
    text = (MODEL_DIR / "config.pbtxt").read_text()
    assert 'platform: "onnxruntime_onnx"' in text and "dynamic_batching" in text and "KIND_CPU" in text
    assert "KIND_GPU" in text
    s, (h, w) = metadata["input_size"], metadata["outputs"]["cam"][1:]
    assert f"dims: [ 1, {s}, {s} ]" in text and f"dims: [ {h}, {w} ]" in text
    assert int(re.search(r"max_batch_size:\s*(\d+)", text).group(1)) >= 8


def test_shared_dicom_and_its_jpeg_give_the_same_probability(shared_data: Path, session, metadata) -> None:
    """The shared DICOMs wrap training JPEGs (img2dcm, JPEG baseline): DICOM path == image path."""
    dicoms = sorted((shared_data / "dicom").glob("*.dcm"))
    jpegs = [
        shared_data / "kermany224" / "train" / ("NORMAL" if "IM-" in p.stem else "PNEUMONIA") / f"{p.stem}.jpeg"
        for p in dicoms
    ]
    p_dcm = probability(session, metadata, [preprocess_dicom(pydicom.dcmread(p)) for p in dicoms])
    p_jpg = probability(session, metadata, [preprocess_image_file(p) for p in jpegs])
    assert np.max(np.abs(p_dcm - p_jpg)) < 0.02, (p_dcm, p_jpg)


def test_jpeg_compressed_and_uncompressed_dicom_give_near_identical_probabilities(
    shared_data: Path, session, metadata, tmp_path: Path
) -> None:
    names = ["person41_bacteria_208", "person369_virus_750", "IM-0272-0001", "NORMAL2-IM-0465-0001"]
    plain, compressed = [], []
    for name in names:
        folder = "NORMAL" if "IM-" in name else "PNEUMONIA"
        gray8 = np.round(load_image_file(shared_data / "kermany224" / "train" / folder / f"{name}.jpeg") * 255)
        src, dst = tmp_path / f"{name}.dcm", tmp_path / f"{name}-jpeg.dcm"
        make_dicom(gray8.astype(np.uint8)).save_as(src, enforce_file_format=True)
        subprocess.run(["/usr/bin/dcmcjpeg", "+eb", "+q", "90", str(src), str(dst)], check=True, timeout=60)
        ds = pydicom.dcmread(dst)
        assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"  # JPEG baseline, lossy
        plain.append(preprocess_dicom(pydicom.dcmread(src)))
        compressed.append(preprocess_dicom(ds))
    p_plain, p_jpeg = probability(session, metadata, plain), probability(session, metadata, compressed)
    assert np.max(np.abs(p_plain - p_jpeg)) < 0.03, (p_plain, p_jpeg)


def test_monochrome1_copy_gives_the_same_probability(shared_data: Path, session, metadata) -> None:
    path = shared_data / "kermany224" / "train" / "PNEUMONIA" / "person41_bacteria_208.jpeg"
    gray12 = (np.round(load_image_file(path) * 255) * 16).astype(np.uint16)
    mono2 = make_dicom(gray12, "MONOCHROME2", bits_stored=12)
    mono1 = make_dicom((4095 - gray12).astype(np.uint16), "MONOCHROME1", bits_stored=12)
    p = probability(session, metadata, [preprocess_dicom(mono2), preprocess_dicom(mono1), preprocess_image_file(path)])
    assert abs(p[0] - p[1]) < 1e-5 and abs(p[0] - p[2]) < 1e-3


def test_metadata_metrics_were_computed_not_typed(version_dir: Path, metadata: dict, heldout_report: dict) -> None:
    """The test AUC stored in metadata.json at export equals a fresh evaluation of the same files."""
    stored = metadata["metrics"].get("test", {}).get("auc")
    assert stored is not None
    assert json.loads(json.dumps(stored))["value"] == pytest.approx(heldout_report["metrics"]["auc"]["value"], abs=1e-6)
