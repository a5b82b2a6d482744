"""Training data from a labeling export (`pneumotriage labeling export --out DIR`): the images the
crowd labelled, with each image's posterior and where it comes from, so training can weight or
filter by label quality; `model train --data <export>` reads it (training/sources.py)."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from services.inference.tools.training.dataset import ImageRecord, file_sha256, patient_id


@dataclass(frozen=True)
class ExportRecord:
    record: ImageRecord
    p_pneumonia: float  # the posterior: a soft label
    confidence: float  # max(p, 1 - p)
    posterior_source: str  # crowd | crowd + model prior | clinician


def _path(row: dict[str, str]) -> Path | None:
    if row.get("source_file"):
        return Path(row["source_file"])
    uri = row.get("storage_uri") or ""
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    return None


def records_from_export(
    export_dir: Path,
    min_confidence: float = 0.0,
    sources: tuple[str, ...] = ("crowd", "crowd + model prior", "clinician"),
) -> list[ExportRecord]:
    """Complete images with a pneumonia/healthy label whose posterior is at least min_confidence
    and comes from one of sources, each resolved to its stored image (source file or file:// URI).
    Images whose file is missing, and "can't tell" labels, are left out. The patient is the study
    (DICOM) or the file name's patient, so splits stay patient-level."""
    out: list[ExportRecord] = []
    with open(Path(export_dir) / "labels.csv", newline="") as fh:
        for row in csv.DictReader(fh):
            if row["complete"] != "True" or row["final_label"] not in ("pneumonia", "healthy"):
                continue
            if row.get("posterior_source", "crowd") not in sources:
                continue
            if not row["confidence"] or float(row["confidence"]) < min_confidence:
                continue
            path = _path(row)
            if path is None or not path.is_file():
                continue
            patient = row.get("study_instance_uid") or patient_id(path.name)
            record = ImageRecord(
                path, int(row["final_label"] == "pneumonia"), patient, row["sha256"] or file_sha256(path)
            )
            out.append(
                ExportRecord(record, float(row["p_pneumonia"]), float(row["confidence"]), row["posterior_source"])
            )
    return out
