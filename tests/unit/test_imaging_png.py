"""The PNGs for annotators and the viewer (core imaging.to_png): the same pixels as Pillow's writer."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.core.imaging import png_gray8, to_png
from services.inference.preprocess import load_image_file


def pillow_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decoded(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG" and img.mode == "L"
        return np.asarray(img)


@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (9, 1), (224, 224), (301, 97)])
def test_same_pixels_as_pillow_for_any_bytes(shape: tuple[int, int]) -> None:
    pixels = np.random.default_rng(sum(shape)).integers(0, 256, shape, dtype=np.uint8)
    pixels.flat[0], pixels.flat[-1] = 0, 255  # the wrap-around of the Up filter at both ends
    data = png_gray8(pixels)
    Image.open(io.BytesIO(data)).verify()  # chunk CRCs and structure
    assert np.array_equal(decoded(data), pixels)
    assert np.array_equal(decoded(data), decoded(pillow_png(pixels)))


def test_real_chest_xrays_keep_their_pixels_and_size(shared_data: Path) -> None:
    paths = sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("*.jpeg"))[:20]
    ours = theirs = 0
    for path in paths:
        gray = load_image_file(path)
        pixels = (np.clip(gray, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
        data = to_png(gray, max_side=1024)
        assert np.array_equal(decoded(data), pixels)
        shrunk = to_png(gray, max_side=100)  # Pillow's thumbnail first, then the same encoder
        thumb = Image.fromarray(pixels, mode="L")
        thumb.thumbnail((100, 100), Image.Resampling.LANCZOS)
        assert np.array_equal(decoded(shrunk), np.asarray(thumb))
        ours, theirs = ours + len(data), theirs + len(pillow_png(pixels))
    assert ours < 1.1 * theirs  # about the same size as Pillow's adaptive filters at the same level


def test_refuses_what_is_not_a_2d_image() -> None:
    with pytest.raises(ValueError):
        png_gray8(np.zeros((0, 4), np.uint8))
    with pytest.raises(ValueError):
        png_gray8(np.zeros((4, 4, 3), np.uint8))
