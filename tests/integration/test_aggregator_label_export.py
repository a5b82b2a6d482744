"""`pneumotriage triage export-labels` (issue 28): the site's clinician-confirmed labels as a training
folder that `model adapt --data` reads, one study as one patient, the crowd only when asked. Before:
clinician reviews reached `model adapt` only through a labeling export or a hand-made folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from services.aggregator.cli import triage
from services.aggregator.flags import HEALTHY
from services.aggregator.service import Aggregator
from services.aggregator.tools.label_export import ExportError, labelled_images, write_export
from services.inference.tools.training.sources import load_training_data
from tests.integration.test_aggregator_outputs import flag_a_study, shared_dicom
from tests.support.aggregator_service import offline_aggregator_fixture  # noqa: F401


@pytest.mark.parametrize("offline_aggregator", [{}], indirect=True)
async def test_clinician_labels_become_a_folder_model_adapt_reads(
    offline_aggregator: Aggregator, shared_data: Path, tmp_path: Path
) -> None:
    agg = offline_aggregator
    sick, _ = shared_dicom(shared_data, "PNEUMONIA")
    well, _ = shared_dicom(shared_data, "NORMAL")
    sick_study = await flag_a_study(agg, sick, p=0.97)
    well_study = await flag_a_study(agg, well, p=0.90)  # the model is wrong; the clinician overrules
    unreviewed = next(p for p in sorted((shared_data / "dicom").glob("*.dcm")) if p not in (sick, well))
    await flag_a_study(agg, unreviewed, p=0.5)  # no review: no label
    await agg.review(sick_study, "dr-a", "confirm", None, "")
    await agg.review(well_study, "dr-a", "overrule", HEALTHY, "clear lungs")

    out = tmp_path / "site-labels"
    async with agg.sessions() as s:
        rows = await labelled_images(s)
    result = write_export(out, rows)
    assert result.written == {"NORMAL": 1, "PNEUMONIA": 1} and result.by_source == {"clinician": 2}
    (normal,) = (out / "NORMAL").iterdir()
    (pneumonia,) = (out / "PNEUMONIA").iterdir()
    assert normal.resolve() == well.resolve() and pneumonia.resolve() == sick.resolve()  # links, no copies
    assert normal.is_symlink() and pneumonia.is_symlink()
    lines = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    assert sorted((x["label"], x["source"]) for x in lines) == [("normal", "clinician"), ("pneumonia", "clinician")]

    data = load_training_data(out)  # what model adapt --data reads
    assert sorted(r.label for r in data.records) == [0, 1]
    assert all(r.patient.startswith("study-") for r in data.records)
    assert len({r.patient for r in data.records}) == 2

    with pytest.raises(ExportError):
        write_export(out, rows)  # never into a folder that holds something


def test_cli_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("keep")
    res = CliRunner().invoke(triage, ["export-labels", "--out", str(tmp_path)])
    assert res.exit_code == 2 and "is not empty" in res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]
