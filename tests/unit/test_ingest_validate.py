"""The acceptance policy (DESIGN "Ingest acceptance") on real encoded files, and the content-addressed store."""

from __future__ import annotations

import copy
import hashlib
import io
import os
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from services.ingest.config import IngestSettings
from services.ingest.store import ContentStore, StoreError
from services.ingest.tools.make_dicom import make_dicom
from services.ingest.validate import Action, decide


@pytest.fixture(scope="module")
def image(shared_data: Path) -> Path:
    return sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[0]


@pytest.fixture(scope="module")
def settings() -> IngestSettings:
    return IngestSettings()


def encode(ds: Dataset) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_pa_chest_is_accepted(image: Path, settings: IngestSettings) -> None:
    ds = make_dicom(image, view="PA", age="004Y", bits=12, photometric="MONOCHROME1")
    d = decide(encode(ds), settings, ds.SOPClassUID, ds.SOPInstanceUID)
    assert d.action is Action.ACCEPT and d.triage_eligible and d.status == 0
    assert (d.modality, d.body_part_examined, d.view_position) == ("DX", "CHEST", "PA")
    assert d.patient_age_years == 4 and not d.outside_intended_use
    assert (d.rows, d.columns) == (224, 224)


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"ViewPosition": "LL"}, "view_not_triaged"),
        ({"ViewPosition": ""}, "view_unknown"),
        ({"BodyPartExamined": "HAND"}, "not_chest"),
        ({"Modality": "MG"}, "wrong_modality"),
        ({"BodyPartExamined": "", "SeriesDescription": "KNEE", "StudyDescription": "KNEE"}, "not_chest"),
    ],
)
def test_valid_images_outside_the_workflow_are_stored_not_triaged(
    image: Path, settings: IngestSettings, change: dict[str, str], code: str
) -> None:
    ds = make_dicom(image)
    for k, v in change.items():
        setattr(ds, k, v)
    d = decide(encode(ds), settings)
    assert d.action is Action.STORE_ONLY and d.status == 0 and d.stored and not d.triage_eligible
    assert d.reason_code == code and d.reason.startswith(code)


def test_chest_like_description_stands_in_for_missing_body_part(image: Path, settings: IngestSettings) -> None:
    ds = make_dicom(image)
    ds.BodyPartExamined = ""
    ds.SeriesDescription = "Thorax p.a."
    assert decide(encode(ds), settings).action is Action.ACCEPT


def test_adults_are_triaged_but_marked(image: Path, settings: IngestSettings) -> None:
    ds = make_dicom(image, age="045Y")
    d = decide(encode(ds), settings)
    assert d.action is Action.ACCEPT and d.outside_intended_use
    assert "45" in d.intended_use_note and "intended use" in d.intended_use_note
    # age from birth date when PatientAge is absent
    del ds.PatientAge
    ds.PatientBirthDate, ds.StudyDate = "19900101", "20260101"
    assert decide(encode(ds), settings).patient_age_years == 36
    del ds.PatientBirthDate
    unknown = decide(encode(ds), settings)
    assert (
        unknown.patient_age_years == -1 and not unknown.outside_intended_use and "unknown" in unknown.intended_use_note
    )


def test_policy_is_configurable(image: Path) -> None:
    ds = make_dicom(image, view="LL")
    assert decide(encode(ds), IngestSettings(triage_views="PA,AP,LL")).action is Action.ACCEPT
    assert (
        decide(encode(make_dicom(image, age="030Y")), IngestSettings(max_intended_age_years=40)).outside_intended_use
        is False
    )


def test_uid_mismatches_are_refused(image: Path, settings: IngestSettings) -> None:
    ds = make_dicom(image)
    data = encode(ds)
    assert decide(data, settings, "1.2.840.10008.5.1.4.1.1.2", ds.SOPInstanceUID).reason_code == "sop_class_mismatch"
    assert decide(data, settings, ds.SOPClassUID, "1.2.3").reason_code == "sop_instance_mismatch"
    assert decide(data, settings, "1.2.840.10008.5.1.4.1.1.2").status == 0xA900


def test_color_and_multiframe_are_stored_not_triaged(image: Path, settings: IngestSettings) -> None:
    ds = make_dicom(image)
    rgb = copy.deepcopy(ds)
    rgb.SamplesPerPixel, rgb.PhotometricInterpretation, rgb.PlanarConfiguration = 3, "RGB", 0
    rgb.PixelData = bytes(ds.PixelData) * 3
    assert decide(encode(rgb), settings).reason_code == "not_grayscale"
    multi = copy.deepcopy(ds)
    multi.NumberOfFrames = 2
    multi.PixelData = bytes(ds.PixelData) * 2
    assert decide(encode(multi), settings).reason_code == "multi_frame"


def test_store_is_content_addressed_atomic_and_idempotent(tmp_path: Path) -> None:
    store = ContentStore(tmp_path / "store")
    store.root.mkdir()
    data = os.urandom(100_000)
    first = store.put(data)
    assert first.created and first.sha256 == hashlib.sha256(data).hexdigest()
    assert first.path == tmp_path / "store" / first.sha256[:2] / first.sha256[2:4] / f"{first.sha256}.dcm"
    assert first.path.read_bytes() == data and first.uri.startswith("file:///")
    again = store.put(data)
    assert again.path == first.path and not again.created
    assert sorted(p.name for p in store.root.rglob("*") if p.is_file()) == [first.path.name]


def test_store_failure_leaves_nothing(tmp_path: Path) -> None:
    root = tmp_path / "store"
    root.write_bytes(b"a file where the store directory should be")
    with pytest.raises(StoreError):
        ContentStore(root).put(b"DICM" * 100)
    assert root.read_bytes().startswith(b"a file")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["store"]


def _corrupt_vr(raw: bytes, tag: bytes, vr: bytes) -> bytes:
    """Overwrite the explicit VR of the first element with this tag (little endian group, element)."""
    at = raw.index(tag)
    return raw[: at + 4] + vr + raw[at + 6 :]


def test_a_corrupt_vr_is_a_refusal_or_ignored_never_an_internal_error(image: Path, settings: IngestSettings) -> None:
    # Found by the fuzz test: an unknown VR on PatientAge (0010,1010) raised NotImplementedError out of
    # decide() when the age was read, and the C-STORE was answered 0xA700 "internal_error".
    ds = make_dicom(image, view="PA", age="004Y")
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1"  # explicit VR little endian
    # no birth date: since make-dicom dates its studies today, the dates would give 4 years as well
    ds.PatientBirthDate = ""
    raw = _corrupt_vr(encode(ds), b"\x10\x00\x10\x10AS", b"Al")
    d = decide(raw, settings, ds.SOPClassUID, ds.SOPInstanceUID)
    assert d.status == 0 and d.patient_age_years == -1  # the unreadable PatientAge is ignored (age unknown)
    # an element the policy needs that cannot be read at all is a refusal with a reason, not an error
    raw = _corrupt_vr(encode(ds), b"\x08\x00\x60\x00CS", b"Zz")  # Modality (0008,0060)
    d = decide(raw, settings, ds.SOPClassUID, ds.SOPInstanceUID)
    assert d.status in (0x0000, 0xA900, 0xC210) and d.reason_code != "internal_error"
