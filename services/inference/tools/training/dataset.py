"""The image folders (NORMAL/, PNEUMONIA/), patient ids from file names, and byte-level de-duplication.

File names carry the patient (see ../shared/data/README.md):
``personNNN_bacteria_MMM.jpeg`` / ``personNNN_virus_MMM.jpeg`` -> ``personNNN``;
``IM-XXXX-YYYY.jpeg`` -> ``IM-XXXX``; ``NORMAL2-IM-XXXX-YYYY.jpeg`` -> ``NORMAL2-IM-XXXX``.
Any other name is its own patient (the stem), so foreign folders still evaluate.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

CLASSES: tuple[str, str] = ("NORMAL", "PNEUMONIA")  # label 0, label 1
IMAGE_SUFFIXES = frozenset({".jpeg", ".jpg", ".png", ".dcm"})

_PERSON = re.compile(r"^(person\d+)_(bacteria|virus)_\d+", re.IGNORECASE)
_IM = re.compile(r"^((?:NORMAL2-)?IM-\d+)-\d+", re.IGNORECASE)
_STUDY = re.compile(r"^(study-[0-9a-f]+)__")  # `triage export-labels`: one study, one patient


@dataclass(frozen=True)
class ImageRecord:
    path: Path
    label: int  # 0 NORMAL, 1 PNEUMONIA
    patient: str
    sha256: str

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def subtype(self) -> str:
        """'normal', 'bacteria', 'virus' or 'pneumonia' (unspecified), from the file name."""
        if self.label == 0:
            return "normal"
        m = _PERSON.match(self.path.stem)
        return m.group(2).lower() if m else "pneumonia"


def patient_id(filename: str) -> str:
    stem = Path(filename).stem
    for pattern in (_PERSON, _IM, _STUDY):
        m = pattern.match(stem)
        if m:
            return m.group(1)
    return stem


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scan_folder(root: Path) -> list[ImageRecord]:
    """Every image under root/NORMAL and root/PNEUMONIA, sorted by (class, name)."""
    root = Path(root)
    records: list[ImageRecord] = []
    for label, cls in enumerate(CLASSES):
        folder = root / cls
        if not folder.is_dir():
            continue
        for path in sorted(folder.iterdir()):
            if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES:
                records.append(ImageRecord(path, label, patient_id(path.name), file_sha256(path)))
    if not records:
        raise FileNotFoundError(f"no images under {root}/NORMAL or {root}/PNEUMONIA")
    return records


def deduplicate(records: list[ImageRecord]) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Drop byte-identical copies, keeping the first in (class, name) order. Returns (kept, dropped)."""
    seen: set[str] = set()
    kept: list[ImageRecord] = []
    dropped: list[ImageRecord] = []
    for rec in records:
        (dropped if rec.sha256 in seen else kept).append(rec)
        seen.add(rec.sha256)
    return kept, dropped


def dataset_sha256(records: list[ImageRecord]) -> str:
    """One hash over (class/name, content hash) of every image: identifies the training data."""
    h = hashlib.sha256()
    for rec in sorted(records, key=lambda r: (r.label, r.name)):
        h.update(f"{CLASSES[rec.label]}/{rec.name}:{rec.sha256}\n".encode())
    return h.hexdigest()
