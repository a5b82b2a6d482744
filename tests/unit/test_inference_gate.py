"""The input gate on real images: held-out chest X-rays (as JPEG and through DICOM with other bit
depths, MONOCHROME1 and true aspect) are rarely refused; non-chest images (pydicom's bundled CT /
MR / NM / US / SC files under a header that claims DX CHEST PA, test patterns, noise, tiny images,
inverted and rotated chests) are never passed as ok."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from services.core.gate import (
    BORDERLINE,
    CHECKS,
    DEFAULT_GATE_FILE,
    OK,
    REFUSE,
    GateModel,
    assess,
    assess_dataset,
    gate_image,
)
from services.core.imaging import display_array
from services.inference.tools.gate_fit import (
    bundled_dicom_images,
    chest_dicom,
    chest_negative,
    chest_records,
    held_out_dicom,
    load_gray,
    synthetic_negative,
)


@pytest.fixture(scope="module")
def gate() -> GateModel:
    return GateModel.load(DEFAULT_GATE_FILE)


@pytest.fixture(scope="module")
def held_out(shared_data: Path) -> list:
    """A fixed sample of val/test chests (the gate was fitted on training patients only)."""
    records = chest_records(shared_data / "kermany224" / "train", ("val", "test"))
    return records[:: max(1, len(records) // 300)][:300]


def test_held_out_chests_are_rarely_refused(gate: GateModel, held_out: list) -> None:
    verdicts = [assess(load_gray(r.path), None, gate).verdict for r in held_out]
    refused = verdicts.count(REFUSE) / len(verdicts)
    assert len(verdicts) >= 250
    assert refused <= 0.01, f"{refused:.3%} of held-out chest X-rays refused"
    assert verdicts.count(OK) / len(verdicts) >= 0.95


@pytest.mark.parametrize("transform", ["mono1_12bit", "16bit_large", "true_aspect", "jpeg"])
def test_other_bit_depths_photometric_and_aspect_are_not_refused(
    gate: GateModel, held_out: list, transform: str
) -> None:
    rng = np.random.default_rng(0)
    sample = held_out[::3][:80]
    verdicts = [assess_dataset(ds, gate).verdict for ds, _ in held_out_dicom(sample, transform, rng)]
    assert verdicts.count(REFUSE) / len(verdicts) <= 0.0125, (transform, verdicts.count(REFUSE))


def _lying_header(arr: np.ndarray) -> pydicom.Dataset:
    """A DX / CHEST / PA file (MONOCHROME2, 8-bit) whose pixels are `arr`: the header lies."""
    return pydicom.dcmread(io.BytesIO(chest_dicom(arr)))


def test_non_chest_images_under_a_chest_header_are_never_ok(gate: GateModel, shared_data: Path) -> None:
    rng = np.random.default_rng(123)  # patterns the fit never drew
    corpus = [(name, arr) for name, arr in bundled_dicom_images()]
    corpus += [synthetic_negative(rng, int(rng.integers(10, 700))) for _ in range(60)]
    chest = load_gray(sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[5])
    corpus += [chest_negative(chest, np.random.default_rng(s)) for s in range(12)]
    passed = []
    refused = 0
    for name, arr in corpus:
        ds = _lying_header(arr)
        verdict = gate_image(ds, str(DEFAULT_GATE_FILE))
        refused += verdict.verdict == REFUSE
        if verdict.verdict == OK:
            passed.append((name, verdict.score))
    assert not passed, f"non-chest images passed the gate: {passed}"
    assert refused / len(corpus) >= 0.85


def test_size_rules_give_readable_reasons() -> None:
    tiny = np.random.default_rng(0).random((10, 10)).astype(np.float32)
    ds = pydicom.Dataset()
    ds.PixelSpacing = [0.3125, 0.3125]
    v = assess(tiny, ds)
    assert v.verdict == REFUSE
    assert "too small to read" in v.reason and "10 × 10 px" in v.reason and "mm" in v.reason
    small = np.random.default_rng(1).random((160, 160)).astype(np.float32)
    assert assess(small).verdict == BORDERLINE and "low resolution" in assess(small).reason
    strip = np.random.default_rng(2).random((1024, 256)).astype(np.float32)
    assert assess(strip).verdict == REFUSE and "aspect ratio 4.0:1" in assess(strip).reason
    ct = pydicom.Dataset()
    ct.Modality = "CT"
    assert "modality CT" in assess(np.random.default_rng(3).random((512, 512)), ct).reason
    assert assess(np.full((400, 400), 0.5, dtype=np.float32)).reason == "blank or nearly uniform image"


def test_each_reason_names_its_rule() -> None:
    """The rule behind the shown reason (a metric label in labeling, issue 29): the worst finding's."""
    rng = np.random.default_rng(5)
    tiny_ds = pydicom.Dataset()
    tiny_ds.PixelSpacing = [0.3125, 0.3125]  # 10 px = 3 mm: both the size and the field-of-view rule
    ct = pydicom.Dataset()
    ct.Modality = "CT"
    wide = pydicom.Dataset()
    wide.PixelSpacing = [3.0, 3.0]  # 400 px = 1.2 m
    cases = [
        (assess(rng.random((10, 10)).astype(np.float32), tiny_ds), REFUSE, "field_of_view"),  # the first refusal
        (assess(rng.random((10, 45)).astype(np.float32)), REFUSE, "size"),
        (assess(rng.random((160, 160)).astype(np.float32)), BORDERLINE, "size"),
        (assess(rng.random((1024, 256)).astype(np.float32)), REFUSE, "aspect"),
        (assess(rng.random((400, 400)).astype(np.float32), wide), REFUSE, "field_of_view"),
        (assess(rng.random((512, 512)), ct), REFUSE, "modality"),
        (assess(np.full((400, 400), 0.5, dtype=np.float32)), REFUSE, "blank"),
    ]
    for verdict, expected, check in cases:
        assert (verdict.verdict, verdict.check) == (expected, check), verdict.reason
        assert check in CHECKS
    assert assess(rng.random((400, 400)).astype(np.float32)).check == ""  # no model: no score, rules pass


def test_real_dicom_files_pass(gate: GateModel, shared_data: Path) -> None:
    files = sorted((shared_data / "dicom").glob("*.dcm"))
    verdicts = [gate_image(pydicom.dcmread(f), str(DEFAULT_GATE_FILE)) for f in files]
    assert all(v.verdict != REFUSE for v in verdicts), [
        (f.name, v.reason) for f, v in zip(files, verdicts, strict=True)
    ]
    assert all(v.score is not None and 0 <= v.score <= 1 for v in verdicts)


def test_artifact_round_trips_and_matches_the_feature_code(gate: GateModel, tmp_path: Path) -> None:
    gate.save(tmp_path / "g.json")
    again = GateModel.load(tmp_path / "g.json")
    arr = display_array(pydicom.dcmread(io.BytesIO(chest_dicom(np.eye(300, dtype=np.float32)))))
    assert abs(again.score(arr) - gate.score(arr)) < 1e-4
    assert 0 < gate.refuse_below <= gate.borderline_below < 1


def test_the_display_image_passed_in_gives_the_same_verdict(gate: GateModel, shared_data: Path) -> None:
    """load_image hands the gate the display image it decoded for the model: the same verdict as the
    gate decoding its own preview (used as is below 2 x PREVIEW_SIDE, ignored above)."""
    files = sorted((shared_data / "dicom").glob("*.dcm"))
    big = np.tile(load_gray(sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[0]), (3, 3))
    datasets = [pydicom.dcmread(f) for f in files] + [
        pydicom.dcmread(io.BytesIO(chest_dicom(big, bits=12, photometric="MONOCHROME1")))
    ]
    assert max(int(ds.Rows) for ds in datasets) >= 2 * 256  # one is subsampled for the preview
    for ds in datasets:
        alone = assess_dataset(ds, gate)
        given = assess_dataset(ds, gate, display_array(ds))
        assert (given.verdict, given.reason, given.score, given.version) == (
            alone.verdict,
            alone.reason,
            alone.score,
            alone.version,
        )
