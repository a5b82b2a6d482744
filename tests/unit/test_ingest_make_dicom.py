"""make-dicom: every transfer syntax decodes, lossless ones bit-exact, plausible DX headers, patient grouping."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.uid import UID

from services.core.imaging import display_array, patient_age_years
from services.ingest.tools.make_dicom import TRANSFER_SYNTAXES, DicomOptions, make_dicom, make_dicom_file, patient_key

LOSSLESS = ["explicit", "implicit", "deflate", "jpeg-lossless", "jpeg-lossless-14", "jpeg2000", "rle"]


@pytest.fixture(scope="module")
def image(shared_data: Path) -> Path:
    return sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("person*_bacteria_*.jpeg"))[0]


@pytest.mark.parametrize("name", sorted(TRANSFER_SYNTAXES))
@pytest.mark.parametrize("bits", [8, 12, 16])
def test_every_syntax_round_trips(image: Path, tmp_path: Path, name: str, bits: int) -> None:
    if name == "jpeg-baseline" and bits != 8:
        with pytest.raises(ValueError):
            make_dicom(image, transfer_syntax=name, bits=bits)
        return
    reference = make_dicom(image, transfer_syntax="explicit", bits=bits).pixel_array
    path = make_dicom_file(image, tmp_path, transfer_syntax=name, bits=bits)
    ds = pydicom.dcmread(path)
    assert ds.file_meta.TransferSyntaxUID == TRANSFER_SYNTAXES[name]
    assert UID(ds.file_meta.TransferSyntaxUID).is_compressed == (name not in ("explicit", "implicit", "deflate"))
    arr = ds.pixel_array
    assert arr.shape == reference.shape == (224, 224)
    assert ds.BitsStored == bits and ds.BitsAllocated == (8 if bits == 8 else 16)
    if name in LOSSLESS:
        assert np.array_equal(arr, reference)
    else:
        assert np.abs(arr.astype(float) - reference).mean() < 0.05 * (1 << bits)


def test_headers_are_plausible_dx(image: Path) -> None:
    ds = make_dicom(image, view="AP", age="003Y", bits=12, size=600)
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1"  # DX For Presentation
    assert ds.Modality == "DX" and ds.BodyPartExamined == "CHEST" and ds.ViewPosition == "AP"
    assert ds.PresentationIntentType == "FOR PRESENTATION"
    assert (ds.Rows, ds.Columns) == (600, 600)
    assert float(ds.PixelSpacing[0]) * ds.Columns == pytest.approx(250, rel=0.01)
    assert patient_age_years(ds) == 3
    assert 0 < float(ds.WindowWidth) <= 4096 and 0 < float(ds.WindowCenter) < 4096
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.PatientID == f"KERMANY-{patient_key(image)}"
    cr = make_dicom(image, modality="CR")
    assert cr.SOPClassUID == "1.2.840.10008.5.1.4.1.1.1" and cr.Modality == "CR"
    assert make_dicom(image, intent="processing").SOPClassUID == "1.2.840.10008.5.1.4.1.1.1.1.1"


def test_monochrome1_displays_like_monochrome2(image: Path) -> None:
    m2 = display_array(make_dicom(image, photometric="MONOCHROME2", bits=16))
    m1 = display_array(make_dicom(image, photometric="MONOCHROME1", bits=16))
    assert np.abs(m1 - m2).mean() < 0.02


def test_uids_deterministic_and_grouped_by_patient(shared_data: Path) -> None:
    folder = shared_data / "kermany224" / "train" / "PNEUMONIA"
    by_patient: dict[str, list[Path]] = {}
    for p in sorted(folder.glob("person*.jpeg"))[:400]:
        by_patient.setdefault(patient_key(p), []).append(p)
    a, b = next(v for v in by_patient.values() if len(v) >= 2)[:2]
    other = next(v[0] for k, v in by_patient.items() if k != patient_key(a))
    da, db, do = make_dicom(a), make_dicom(b), make_dicom(other)
    assert da.StudyInstanceUID == db.StudyInstanceUID != do.StudyInstanceUID
    assert da.SeriesInstanceUID == db.SeriesInstanceUID
    assert da.SOPInstanceUID != db.SOPInstanceUID
    assert make_dicom(a).SOPInstanceUID == da.SOPInstanceUID  # same input, same instance
    assert make_dicom(a, uid_salt="x").SOPInstanceUID != da.SOPInstanceUID
    assert make_dicom(a, view="LL").SeriesInstanceUID != da.SeriesInstanceUID


@pytest.mark.parametrize(
    ("name", "key"),
    [
        ("person1134_bacteria_3076.jpeg", "1134"),
        ("person369_virus_750.jpeg", "369"),
        ("IM-0272-0001.jpeg", "0272"),
        ("NORMAL2-IM-0465-0001.jpeg", "NORMAL2-0465"),
        ("something.png", "something"),
    ],
)
def test_patient_key_from_kermany_names(name: str, key: str) -> None:
    assert patient_key(name) == key


def test_options_are_validated() -> None:
    for bad in ({"bits": 10}, {"view": "XX"}, {"age": "5 years"}, {"transfer_syntax": "jpeg-ls"}, {"modality": "CT"}):
        with pytest.raises(ValueError):
            DicomOptions(**bad).validate()  # type: ignore[arg-type]
