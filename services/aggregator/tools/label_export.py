"""The site's confirmed labels as a training folder (`pneumotriage triage export-labels`), for
`pneumotriage model adapt --data` (issue 28): clinician confirms / overrules, and optionally the
crowd's confident consensus, exactly the labels `triage recalibrate` uses (recalibrate.py
`collect_labels`: clinician over crowd, images the input gate refused left out).

The folder holds NORMAL/ and PNEUMONIA/ with a symbolic link per image to its stored DICOM file
(nothing is copied) named `study-<hash>__<hash>.dcm`, so that training groups the images of one
study as one patient (services/inference/tools/training/dataset.py `patient_id`), and
`labels.jsonl` (file, SOP instance UID, label, source, the model version that scored it). The stored
files carry the patient's data: the folder is for the site's own ML engineers, inside the hospital,
never for crowd annotators.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from services.aggregator.models import Image
from services.aggregator.stored_images import path_of
from services.aggregator.tools.recalibrate import collect_labels

CLASSES = ("NORMAL", "PNEUMONIA")


class ExportError(ValueError):
    """The output folder cannot be used (exists and is not empty)."""


@dataclass
class LabelExport:
    written: dict[str, int]  # per class
    by_source: dict[str, int]
    missing_files: int  # labelled images whose stored file is gone


def _short(value: str) -> str:
    return hashlib.blake2b(value.encode(), digest_size=6).hexdigest()


async def labelled_images(
    session: AsyncSession, include_crowd: bool = False, crowd_confidence: float = 0.95
) -> list[dict[str, Any]]:
    """Each confirmed label with its study and stored file (clinician only unless include_crowd)."""
    rows = []
    for x in await collect_labels(session, crowd_confidence):
        if not include_crowd and x.source != "clinician":
            continue
        image = await session.get(Image, x.sop_uid)
        rows.append(
            {
                "sop_instance_uid": x.sop_uid,
                "study_uid": image.study_uid if image is not None else "",
                "stored": path_of(image.storage_uri) if image is not None else None,
                "label": x.label,
                "source": x.source,
                "model": x.model_name,
                "model_version": x.model_version,
            }
        )
    return rows


def check_output(out: Path) -> None:
    if out.exists() and any(out.iterdir()):
        raise ExportError(f"{out} is not empty")


def write_export(out: Path, rows: list[dict[str, Any]]) -> LabelExport:
    """The folder: a link per image whose stored file exists, and labels.jsonl."""
    check_output(out)
    result = LabelExport({c: 0 for c in CLASSES}, {}, 0)
    lines = []
    out.mkdir(parents=True, exist_ok=True)
    for row in rows:
        source = row["stored"]
        if source is None or not source.is_file():
            result.missing_files += 1
            continue
        cls = CLASSES[row["label"]]
        name = f"study-{_short(row['study_uid'])}__{_short(row['sop_instance_uid'])}.dcm"
        (out / cls).mkdir(exist_ok=True)
        (out / cls / name).symlink_to(source.resolve())
        result.written[cls] += 1
        result.by_source[row["source"]] = result.by_source.get(row["source"], 0) + 1
        lines.append(
            {
                "file": f"{cls}/{name}",
                "sop_instance_uid": row["sop_instance_uid"],
                "label": cls.lower(),
                "source": row["source"],
                "model": row["model"],
                "model_version": row["model_version"],
            }
        )
    (out / "labels.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return result
