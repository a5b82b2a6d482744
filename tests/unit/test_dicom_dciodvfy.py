"""What PneumoTriage writes as DICOM passes dciodvfy (dicom3tools) with 0 errors (issue 23, item 6):
`pneumotriage make-dicom`'s DX / CR objects (before: 7 errors on a DX: Laterality present for an
unpaired body part, ImageLaterality, PresentationLUTShape, AnatomicRegionSequence, PositionerType,
AcquisitionContextSequence, PixelSpacingCalibrationDescription) and the aggregator's Basic Text SR
(first revision, and a verified revision with its predecessor and evidence), and the heatmap
Secondary Capture (services/aggregator/heatmap_sc.py)."""

from __future__ import annotations

import io
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pydicom
import pytest

from services.aggregator.flags import URGENT
from services.aggregator.heatmap_sc import build_heatmap_sc, encode_sc
from services.aggregator.report import StudyReport
from services.aggregator.sr import SopRef, build_sr, encode_sr
from services.inference.heatmaps import render_heatmap
from services.ingest.tools.make_dicom import make_dicom, make_dicom_file
from tests.support.dciodvfy import errors, report


@pytest.fixture(scope="module")
def image(shared_data: Path) -> Path:
    return sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("person*_bacteria_*.jpeg"))[0]


# deflate is left out: dciodvfy cannot read a deflated data set at all ("Dicom dataset read failed")
VARIANTS = {
    "dx-pa-explicit": {},
    "dx-mono1-16bit": {"photometric": "MONOCHROME1", "bits": 16},
    "dx-for-processing-12bit": {"intent": "processing", "bits": 12},
    "dx-ap-jpeg-baseline": {"view": "AP", "transfer_syntax": "jpeg-baseline"},
    "dx-ll-rle": {"view": "LL", "transfer_syntax": "rle"},
    "dx-jpeg-lossless-16bit": {"transfer_syntax": "jpeg-lossless", "bits": 16},
    "dx-jpeg2000-lossy": {"transfer_syntax": "jpeg2000-lossy"},
    "cr-jpeg2000-12bit": {"modality": "CR", "transfer_syntax": "jpeg2000", "bits": 12},
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_make_dicom_passes_dciodvfy(image: Path, tmp_path: Path, name: str) -> None:
    path = make_dicom_file(image, tmp_path, **VARIANTS[name])
    assert errors(path) == [], report(path)


@pytest.mark.parametrize("revision", ["first", "verified-with-predecessor"])
def test_the_sr_passes_dciodvfy(image: Path, tmp_path: Path, revision: str) -> None:
    header = make_dicom(image)
    report_ = StudyReport(
        study_uid=header.StudyInstanceUID,
        flag=URGENT,
        p_pneumonia=0.91,
        reason="model: pneumonia likely",
        revision=1 if revision == "first" else 2,
        model_version="2",
        human_judgments=3,
        reviewed=revision != "first",
        updated_at=datetime.now(UTC),
        sop_uids=(header.SOPInstanceUID,),
    )
    evidence = [SopRef(header.SeriesInstanceUID, header.SOPClassUID, header.SOPInstanceUID)]
    if revision == "first":
        ds = build_sr(report_, header, evidence=evidence, complete=False)
    else:
        ds = build_sr(
            report_, header, predecessor_sop_uid="1.2.826.0.1.3680043.10.1.1", evidence=evidence, verified_by="Doe^J"
        )
    path = tmp_path / "sr.dcm"
    path.write_bytes(encode_sr(ds))
    assert errors(path) == [], report(path)


@pytest.mark.parametrize("variant", ["dx-pa-explicit", "dx-mono1-16bit"])
def test_the_heatmap_secondary_capture_passes_dciodvfy(image: Path, tmp_path: Path, variant: str) -> None:
    source = make_dicom(image, **VARIANTS[variant])
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[2:5, 1:3] = 1.0  # a hot spot on the image's right lung
    buf = io.BytesIO()
    render_heatmap(cam, int(source.Rows), int(source.Columns), 224).save(buf, format="PNG")
    ds = build_heatmap_sc(source, buf.getvalue(), flag=URGENT, p_pneumonia=0.912, model_version="2", revision=3)
    path = tmp_path / "sc.dcm"
    path.write_bytes(encode_sc(ds))
    assert errors(path) == [], report(path)
    read = pydicom.dcmread(path)
    assert read.StudyInstanceUID == source.StudyInstanceUID and read.SeriesInstanceUID != source.SeriesInstanceUID
    assert (
        read.BurnedInAnnotation == "YES"
        and read.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
    )
    rgb = read.pixel_array
    assert rgb.shape == (source.Rows, source.Columns, 3)
    # colour where the heatmap is, grey elsewhere below the burned-in band; the band is dark with text
    saturation = rgb.max(axis=2).astype(int) - rgb.min(axis=2)
    assert saturation[110:150, 40:80].mean() > 40 and saturation[200:, 150:].mean() < 5
    assert (
        build_heatmap_sc(source, buf.getvalue(), flag=URGENT, p_pneumonia=0.9, model_version="2", revision=3)[
            "SOPInstanceUID"
        ].value
        == read.SOPInstanceUID
    )  # a re-send is the same object
