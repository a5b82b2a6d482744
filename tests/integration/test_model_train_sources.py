"""`pneumotriage model train` reads what the product has (issue 27, item 5): DICOM files through the
service's own display path (before: PIL's UnidentifiedImageError on a .dcm), and a labeling export
(labels.csv: the posterior as a soft label, the study as the patient, split by patient
automatically; before: "no images under .../NORMAL"). Tiny 1-epoch runs on 24 real chest X-rays."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
from pydicom.uid import generate_uid
from typer.testing import CliRunner

from services.inference.preprocess import load_image_file
from services.inference.tools.model_cli import app
from services.inference.tools.training.sources import load_training_data
from tests.support.model_dicom import make_dicom

N_PER_CLASS = 12


@pytest.fixture(scope="module")
def dicom_folder(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """NORMAL/ and PNEUMONIA/ of DICOM files (12-bit MONOCHROME2) made from real chest X-rays."""
    root = tmp_path_factory.mktemp("dicom-data")
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir()
        for src in sorted((shared_data / "kermany224" / "train" / cls).glob("*.jpeg"))[:N_PER_CLASS]:
            pixels = (np.round(load_image_file(src) * 4095)).astype(np.uint16)
            ds = make_dicom(pixels, bits_stored=12)
            ds.StudyInstanceUID = generate_uid()
            ds.save_as(root / cls / f"{src.stem}.dcm", enforce_file_format=True)
    return root


def export_of(folder: Path, out: Path) -> Path:
    """A labeling export of those files: one study each, a crowd posterior, complete."""
    out.mkdir()
    rows = []
    for label, cls in enumerate(("NORMAL", "PNEUMONIA")):
        for i, path in enumerate(sorted((folder / cls).glob("*.dcm"))):
            p = 0.9 - 0.05 * (i % 3) if label else 0.1 + 0.05 * (i % 3)
            rows.append(
                {
                    "study_instance_uid": f"2.25.{label}{i:04d}",
                    "storage_uri": path.resolve().as_uri(),
                    "source_file": "",
                    "sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
                    "complete": "True",
                    "final_label": "pneumonia" if label else "healthy",
                    "p_pneumonia": f"{p:.3f}",
                    "confidence": f"{max(p, 1 - p):.3f}",
                    "posterior_source": "crowd",
                }
            )
    with open(out / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return out


def train(data: Path, tmp_path: Path, *extra: str) -> tuple[object, Path]:
    repo = tmp_path / "repo"
    args = ["model", "train", "--data", str(data), "--out", str(repo), "--checkpoint", str(tmp_path / "c.pt")]
    args += ["--epochs", "1", "--input-size", "64", "--threads", "1", *extra]
    result = CliRunner().invoke(app, args, env={"PT_DATA_DIR": str(tmp_path / "var"), "COLUMNS": "200"})
    return result, repo / "pneumonia" / "1"


def test_train_reads_dicom_files(dicom_folder: Path, tmp_path: Path) -> None:
    result, v1 = train(dicom_folder, tmp_path, "--split-file", str(tmp_path / "split.json"))
    assert result.exit_code == 0, result.output
    meta = json.loads((v1 / "metadata.json").read_text())
    assert "test" in meta["metrics"] and "test split" in result.output
    assert meta["onnx_check"]["max_abs_diff_logit"] < 1e-4


def test_train_reads_a_labeling_export_with_soft_labels_and_a_patient_split(dicom_folder: Path, tmp_path: Path) -> None:
    export = export_of(dicom_folder, tmp_path / "export")
    data = load_training_data(export)
    assert data.kind == "export" and len(data.records) == 2 * N_PER_CLASS
    assert {round(data.target(r), 3) for r in data.records} >= {0.9, 0.1}  # soft labels, not 0/1
    assert len({r.patient for r in data.records}) == 2 * N_PER_CLASS  # study = patient

    result, v1 = train(export, tmp_path)  # the committed split knows none of these studies
    assert result.exit_code == 0, result.output
    assert "labeling export: automatic patient-level split" in result.output
    splits = list((tmp_path / "var" / "model-staging" / "splits").glob("auto-*.json"))
    assert len(splits) == 1
    split = json.loads(splits[0].read_text())
    held_out = set(split["val_patients"]) | set(split["test_patients"])
    assert held_out and held_out <= {r.patient for r in data.records}
    meta = json.loads((v1 / "metadata.json").read_text())
    assert "test" in meta["metrics"], meta["metrics"]
