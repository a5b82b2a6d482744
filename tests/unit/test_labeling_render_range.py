"""Hidden gold must not be told from work by its pixels (issue 22, item 4): gold and quiz images
(JPEG files from the public set) and work images (DICOM from the PACS) leave through the same
rendering, with the same contrast stretch, so every PNG spans 0-255 and the same pixels give the
same PNG whichever way they arrived."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image

from services.labeling.gold import choose_gold
from services.labeling.render import render_source
from tests.support.labeling_service import marked_dicom


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_gold_renders_exactly_like_the_same_pixels_sent_as_work(shared_data: Path, tmp_path: Path) -> None:
    gold = choose_gold(shared_data / "kermany224" / "train", 48, seed=7)  # the CLI's default gold set
    narrow = 0
    for i, (src, _label) in enumerate(gold):
        with Image.open(src) as img:
            raw = np.asarray(img.convert("L"))
        narrow += int(raw.min() > 0 or raw.max() < 255)
        work = tmp_path / f"{i}.dcm"  # the same pixels as a work image arriving over DICOM
        marked_dicom(src, work, i)
        gold_png, work_png = render_source(src, 1024), render_source(work, 1024)
        px = _pixels(gold_png)
        assert (int(px.min()), int(px.max())) == (0, 255), f"{src.name}: gold spans {px.min()}-{px.max()}"
        assert gold_png == work_png, f"{src.name}: gold and work renderings of the same pixels differ"
    assert narrow > 0, "the gold set must include images whose own range is narrower than 0-255"


def test_shrunk_images_still_span_the_full_range(shared_data: Path, tmp_path: Path) -> None:
    """A large narrow-range image shrunk for the browser keeps the full 8-bit range (resampling must
    not leave a tell-tale range on big work images either)."""
    src = sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[0]
    dcm = tmp_path / "big.dcm"
    marked_dicom(src, dcm, 0)
    ds = pydicom.dcmread(dcm)
    arr = np.asarray(ds.pixel_array, dtype=np.float32)
    big = np.kron(arr, np.ones((8, 8), dtype=np.float32))  # 1792 px, to be shrunk to 256
    big = 60 + big * (100 / 255.0)  # a narrow window: 60-160
    big[0, 0], big[-1, -1] = 20, 230  # lone extreme pixels that resampling would average away
    ds.Rows, ds.Columns = big.shape
    ds.PixelData = big.astype(np.uint8).tobytes()
    ds.save_as(dcm, enforce_file_format=True)
    for path in (dcm, _as_jpeg_free_png(big, tmp_path / "big.png")):
        px = _pixels(render_source(path, 256))
        assert max(px.shape) == 256
        assert (int(px.min()), int(px.max())) == (0, 255), f"{path.name}: spans {px.min()}-{px.max()}"


def _as_jpeg_free_png(arr: np.ndarray, out: Path) -> Path:
    Image.fromarray(arr.astype(np.uint8), mode="L").save(out)
    return out
