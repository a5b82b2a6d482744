"""Heatmaps line up with the preprocessing geometry and are overlay-ready PNGs."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from services.inference.heatmaps import content_box, render_heatmap, save_heatmap
from services.inference.preprocess import INPUT_SIZE, load_image_file, preprocess_array, resize_to_fit


@pytest.mark.parametrize("shape", [(224, 224), (224, 150), (150, 224), (2048, 1663), (97, 301), (3000, 2)])
def test_content_box_is_where_preprocessing_puts_the_image(shape: tuple[int, int]) -> None:
    gray = np.random.default_rng(0).random(shape, dtype=np.float32)
    _, box = resize_to_fit(gray, INPUT_SIZE)
    assert content_box(*shape, INPUT_SIZE) == box


def test_padding_outside_the_box_on_a_real_image(shared_data: Path) -> None:
    path = sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    gray = load_image_file(path)[:, 30:190]  # a real chest, made non-square
    tensor = preprocess_array(gray)[0]
    top, left, h, w = content_box(*gray.shape, INPUT_SIZE)
    inside = np.zeros_like(tensor, dtype=bool)
    inside[top : top + h, left : left + w] = True
    assert np.all(tensor[~inside] == 0.0)
    assert np.count_nonzero(tensor[inside]) > 0.95 * inside.sum()


def test_render_keeps_aspect_and_shows_only_positive_evidence() -> None:
    cam = np.full((12, 12), -3.0, dtype=np.float32)
    cam[2:5, 4:7] = 4.0  # evidence for pneumonia in the upper part of the content
    img = render_heatmap(cam, rows=2000, columns=1000, input_size=INPUT_SIZE, max_side=400).convert("RGBA")
    assert img.size == (200, 400)
    alpha = np.asarray(img)[..., 3]
    assert alpha[-50:, :].max() == 0  # lower part: negative CAM, transparent
    assert alpha[:200, :].max() > 100
    flat = render_heatmap(np.full((12, 12), -1.0, np.float32), 500, 500, INPUT_SIZE).convert("RGBA")
    assert np.asarray(flat)[..., 3].max() == 0


def test_save_writes_png_atomically_with_provenance(tmp_path: Path) -> None:
    cam = np.linspace(-1, 2, 144, dtype=np.float32).reshape(12, 12)
    uri = save_heatmap(tmp_path, "1.2.3.4", cam, 224, 224, INPUT_SIZE, "pneumonia", "7")
    assert uri.startswith("file://") and uri.endswith("_pneumonia-v7.png")
    path = Path(uri.removeprefix("file://"))
    with Image.open(io.BytesIO(path.read_bytes())) as img:
        assert img.size == (160, 160)
        rgba = np.asarray(img.convert("RGBA"))
        assert rgba[..., 3].max() > 150 and rgba[..., 3].min() == 0  # opaque where the CAM peaks
        assert img.text["pt:model"] == "pneumonia:7"
        assert float(img.text["pt:cam_max"]) == pytest.approx(2.0)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temp files left
    assert save_heatmap(tmp_path, "1.2.3.4", cam, 224, 224, INPUT_SIZE, "pneumonia", "7") == uri
