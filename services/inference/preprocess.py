"""The one preprocessing path shared by training, evaluation and serving (no train/serve skew).

display image (2D float in [0, 1], bright = dense)  ->  float32 tensor [1, S, S]:

1. aspect-preserving resize so that the longer side is ``INPUT_SIZE`` (Pillow, bilinear with
   antialiasing), centred on a square canvas;
2. per-image intensity standardisation over the image content (zero mean, unit variance), so the
   tensor does not depend on the window, bit depth or overall brightness of the source;
3. padding (for non-square sources) with 0, i.e. the image's mean grey after standardisation.

DICOM pixels reach this module through ``services.core.imaging.display_array`` (modality LUT,
VOI LUT / window, MONOCHROME1 inversion, any bit depth); JPEG/PNG files are read as 8-bit grey.
Pure numpy + Pillow: serving does not need torch.

Note on aspect: the training copy of the Kermany images was squashed to 224 x 224 by a third party,
so the network learned from squashed chests; real DICOM keeps its true aspect and is padded here.
See docs/model-card.md ("Aspect ratio").
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset

from services.core.imaging import display_array

INPUT_SIZE = 192
# Standardised values are clipped to this range so that burnt-in labels or a few saturated
# pixels cannot dominate the input.
CLIP = 5.0


def resize_to_fit(gray: np.ndarray, size: int = INPUT_SIZE) -> tuple[np.ndarray, tuple[int, int, int, int]]:
    """Resize so the longer side equals ``size`` (aspect kept). Returns the resized array and the
    (top, left, height, width) box it will occupy on the ``size`` x ``size`` canvas."""
    h, w = gray.shape
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    if (new_h, new_w) != (h, w):
        img = Image.fromarray(np.asarray(gray, dtype=np.float32), mode="F")
        gray = np.asarray(img.resize((new_w, new_h), Image.Resampling.BILINEAR, reducing_gap=None), dtype=np.float32)
    top, left = (size - new_h) // 2, (size - new_w) // 2
    return gray, (top, left, new_h, new_w)


def preprocess_array(gray: np.ndarray, size: int = INPUT_SIZE) -> np.ndarray:
    """2D display image (float in [0, 1]) -> normalised float32 tensor [1, size, size]."""
    arr = np.asarray(gray, dtype=np.float32)
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # RGB(A) of a grey image
        arr = arr[..., :3] @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    if arr.ndim != 2 or min(arr.shape) < 2:
        raise ValueError(f"expected a 2D image, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError("image contains NaN or infinite values")
    content, (top, left, h, w) = resize_to_fit(arr, size)
    mean = float(content.mean())
    std = float(content.std())
    content = (content - mean) / max(std, 1e-3)
    np.clip(content, -CLIP, CLIP, out=content)
    out = np.zeros((1, size, size), dtype=np.float32)
    out[0, top : top + h, left : left + w] = content
    return out


def preprocess_dicom(ds: Dataset, size: int = INPUT_SIZE, frame: int = 0) -> np.ndarray:
    """pydicom Dataset -> tensor [1, size, size] (MONOCHROME1, VOI LUT and bit depth handled by display_array)."""
    return preprocess_array(display_array(ds, frame=frame), size)


def load_image_file(path: str | Path) -> np.ndarray:
    """JPEG/PNG -> 2D float32 display image in [0, 1] (colour images converted to luminance)."""
    with Image.open(path) as img:
        if img.mode in ("I;16", "I;16B", "I;16L", "I"):
            arr = np.asarray(img, dtype=np.float32)
            hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
            return np.clip(arr / hi, 0.0, 1.0)
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def preprocess_image_file(path: str | Path, size: int = INPUT_SIZE) -> np.ndarray:
    """JPEG/PNG file -> tensor [1, size, size]."""
    return preprocess_array(load_image_file(path), size)
