"""Training data from a labeling export: complete, confident rows resolved to their stored images."""

from __future__ import annotations

import csv
from pathlib import Path

from services.inference.tools.training.from_export import records_from_export
from services.labeling.export import DATASET_COLUMNS


def test_records_from_export(tmp_path: Path, shared_data: Path) -> None:
    train = shared_data / "kermany224" / "train"
    pneu, norm, other = sorted((train / "PNEUMONIA").glob("*.jpeg"))[:3]
    healthy = sorted((train / "NORMAL").glob("*.jpeg"))[0]
    base = {c: "" for c in DATASET_COLUMNS}
    rows = [
        {
            **base,
            "source_file": str(pneu),
            "final_label": "pneumonia",
            "p_pneumonia": "0.99",
            "confidence": "0.99",
            "complete": "True",
            "posterior_source": "crowd",
        },
        {
            **base,
            "storage_uri": healthy.resolve().as_uri(),
            "study_instance_uid": "1.2.3",
            "final_label": "healthy",
            "p_pneumonia": "0.02",
            "confidence": "0.98",
            "complete": "True",
            "posterior_source": "crowd + model prior",
        },
        {
            **base,
            "source_file": str(norm),
            "final_label": "pneumonia",
            "p_pneumonia": "0.6",
            "confidence": "0.6",
            "complete": "True",
            "posterior_source": "crowd",
        },  # not confident enough
        {
            **base,
            "source_file": str(other),
            "final_label": "pneumonia",
            "p_pneumonia": "0.99",
            "confidence": "0.99",
            "complete": "False",
            "posterior_source": "crowd",
        },  # still open
        {
            **base,
            "source_file": str(other),
            "final_label": "cant_tell",
            "p_pneumonia": "0.5",
            "confidence": "0.5",
            "complete": "True",
            "posterior_source": "crowd",
        },
        {
            **base,
            "source_file": str(tmp_path / "gone.jpeg"),
            "final_label": "healthy",
            "p_pneumonia": "0.01",
            "confidence": "0.99",
            "complete": "True",
            "posterior_source": "crowd",
        },  # file missing
    ]
    with open(tmp_path / "labels.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, DATASET_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    got = records_from_export(tmp_path, min_confidence=0.9)
    assert [(r.record.path, r.record.label, r.posterior_source) for r in got] == [
        (pneu, 1, "crowd"),
        (healthy.resolve(), 0, "crowd + model prior"),
    ]
    assert got[1].record.patient == "1.2.3" and got[0].record.patient == "person" + pneu.name.split("_")[0][6:]
    assert got[0].p_pneumonia == 0.99 and len(got[0].record.sha256) == 64
    only_crowd = records_from_export(tmp_path, min_confidence=0.9, sources=("crowd",))
    assert [r.record.path for r in only_crowd] == [pneu]
    assert len(records_from_export(tmp_path)) == 3
