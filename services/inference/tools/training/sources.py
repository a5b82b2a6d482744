"""What `model train` (and `model evaluate`) read: a folder laid out as NORMAL/ and PNEUMONIA/ of
JPEG/PNG or DICOM files (DICOM through the service's own display path, services/core/imaging), or a
labeling export (`pneumotriage labeling export --out DIR`: labels.csv, each image's posterior as a
soft label, the study as the patient). An export has no committed split: training splits it by
patient automatically (see `split_for`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from services.inference.tools.training.dataset import ImageRecord, scan_folder


@dataclass
class TrainingData:
    records: list[ImageRecord]
    kind: str  # "folder" | "export"
    soft: dict[Path, float] = field(default_factory=dict)  # export: P(pneumonia) per image

    def target(self, record: ImageRecord) -> float:
        """The training target: the export's posterior (a soft label), else the folder's class."""
        return self.soft.get(record.path, float(record.label))


def is_export(data: Path) -> bool:
    return (Path(data) / "labels.csv").is_file()


def load_training_data(data: Path, min_confidence: float = 0.0) -> TrainingData:
    """The images under `data` (folder or labeling export) as records, with soft labels for an export."""
    if is_export(data):
        from services.inference.tools.training.from_export import records_from_export

        rows = records_from_export(Path(data), min_confidence=min_confidence)
        if not rows:
            raise FileNotFoundError(
                f"no usable images in the labeling export {data} (complete, pneumonia/healthy, file present)"
            )
        records = sorted((r.record for r in rows), key=lambda r: (r.label, r.name))
        return TrainingData(records, "export", {r.record.path: r.p_pneumonia for r in rows})
    return TrainingData(scan_folder(Path(data)), "folder")


def split_for(data: TrainingData, split: dict | None) -> tuple[dict, bool]:
    """The split to use: the given one when it places patients of this data in validation and
    test, else an automatic patient-level split of this data (an export's studies, a folder the
    committed split never saw). Returns (split, automatic)."""
    from services.inference.tools.training.split import assign, make_split

    if split is not None and data.kind == "folder":
        parts = assign(data.records, split)
        if parts["val"] and parts["test"]:
            return split, False
    return make_split(data.records), True
