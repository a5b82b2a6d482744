"""The shared preprocessing on real images: JPEG and DICOM, MONOCHROME1/2, bit depth, window, aspect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest

from services.inference.preprocess import (
    INPUT_SIZE,
    load_image_file,
    preprocess_array,
    preprocess_dicom,
    preprocess_image_file,
)
from tests.support.model_dicom import make_dicom

SAMPLE = "person41_bacteria_208"


@pytest.fixture(scope="module")
def jpeg_path(shared_data: Path) -> Path:
    return shared_data / "kermany224" / "train" / "PNEUMONIA" / f"{SAMPLE}.jpeg"


@pytest.fixture(scope="module")
def gray8(jpeg_path: Path) -> np.ndarray:
    return np.round(load_image_file(jpeg_path) * 255.0).astype(np.uint8)


def test_jpeg_gives_standardised_square_tensor(jpeg_path: Path) -> None:
    t = preprocess_image_file(jpeg_path)
    assert t.shape == (1, INPUT_SIZE, INPUT_SIZE)
    assert t.dtype == np.float32
    assert abs(float(t.mean())) < 0.05
    assert 0.9 < float(t.std()) < 1.1
    assert np.isfinite(t).all()


def test_monochrome1_and_monochrome2_copies_give_the_same_tensor(gray8: np.ndarray) -> None:
    mono2 = make_dicom(gray8.astype(np.uint16) * 16, "MONOCHROME2", bits_stored=12)
    mono1 = make_dicom((4095 - gray8.astype(np.uint16) * 16).astype(np.uint16), "MONOCHROME1", bits_stored=12)
    np.testing.assert_allclose(preprocess_dicom(mono1), preprocess_dicom(mono2), atol=1e-5)


def test_monochrome1_is_inverted_not_ignored(gray8: np.ndarray) -> None:
    inverted = (255 - gray8).astype(np.uint8)
    as_mono2 = preprocess_dicom(make_dicom(inverted, "MONOCHROME2"))
    truth = preprocess_dicom(make_dicom(gray8, "MONOCHROME2"))
    assert np.corrcoef(as_mono2.ravel(), truth.ravel())[0, 1] < -0.9


@pytest.mark.parametrize(("dtype", "bits", "scale"), [(np.uint8, 8, 1), (np.uint16, 12, 16), (np.uint16, 16, 257)])
def test_bit_depth_does_not_change_the_tensor(gray8: np.ndarray, dtype: type, bits: int, scale: int) -> None:
    ds = make_dicom((gray8.astype(np.uint32) * scale).astype(dtype), bits_stored=bits)
    reference = preprocess_array(gray8.astype(np.float32) / 255.0)
    np.testing.assert_allclose(preprocess_dicom(ds), reference, atol=1e-4)


def test_voi_window_is_applied(gray8: np.ndarray) -> None:
    stored = gray8.astype(np.uint16) * 16
    full = preprocess_dicom(make_dicom(stored, bits_stored=12))
    narrow = preprocess_dicom(make_dicom(stored, bits_stored=12, window=(1200.0, 800.0)))
    assert not np.allclose(full, narrow, atol=0.05)
    # pixels saturated by the window share one value
    assert np.unique(narrow).size < np.unique(full).size


@pytest.mark.parametrize(("rows", "cols"), [(300, 200), (180, 420)])
def test_non_square_dicom_is_resized_with_aspect_and_padded(gray8: np.ndarray, rows: int, cols: int) -> None:
    from PIL import Image

    resized = np.asarray(Image.fromarray(gray8).resize((cols, rows), Image.Resampling.BILINEAR), dtype=np.uint8)
    t = preprocess_dicom(make_dicom(resized))[0]
    s = INPUT_SIZE
    h, w = round(rows * s / max(rows, cols)), round(cols * s / max(rows, cols))
    top, left = (s - h) // 2, (s - w) // 2
    content = t[top : top + h, left : left + w]
    assert abs(float(content.mean())) < 1e-3 and abs(float(content.std()) - 1.0) < 0.02
    pad = np.ones_like(t, dtype=bool)
    pad[top : top + h, left : left + w] = False
    assert pad.any() and np.all(t[pad] == 0.0)
    assert content.std(axis=0).min() > 0 and content.std(axis=1).min() > 0  # no padding inside the box


def test_shared_dicom_matches_its_jpeg(shared_data: Path) -> None:
    """The shared DICOMs wrap the training JPEGs (img2dcm): the decoded tensors must agree."""
    dicoms = sorted((shared_data / "dicom").glob("*.dcm"))
    assert len(dicoms) >= 6
    for dcm in dicoms:
        ds = pydicom.dcmread(dcm)
        folder = "NORMAL" if "IM-" in dcm.stem else "PNEUMONIA"
        jpeg = shared_data / "kermany224" / "train" / folder / f"{dcm.stem}.jpeg"
        a, b = preprocess_dicom(ds), preprocess_image_file(jpeg)
        assert a.shape == b.shape == (1, INPUT_SIZE, INPUT_SIZE)
        assert float(np.abs(a - b).mean()) < 0.05, dcm.name
        assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.995, dcm.name


def test_rgb_array_is_converted_to_luminance(gray8: np.ndarray) -> None:
    rgb = np.repeat(gray8[..., None], 3, axis=2).astype(np.float32) / 255.0
    np.testing.assert_allclose(preprocess_array(rgb), preprocess_array(gray8 / 255.0), atol=1e-4)


def test_constant_image_does_not_divide_by_zero() -> None:
    t = preprocess_array(np.full((50, 60), 0.5, dtype=np.float32))
    assert np.all(t == 0.0)


@pytest.mark.parametrize("bad", [np.zeros((4, 4, 4, 4)), np.zeros(10), np.full((8, 8), np.nan)])
def test_invalid_arrays_are_refused(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        preprocess_array(bad)
