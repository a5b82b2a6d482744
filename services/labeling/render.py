"""PHI-free images for the browser: only pixels are rendered (no header field ever reaches a page),
windowed to display range, shrunk, cached as PNG under the render directory by opaque task id.

Every image an annotator sees (work, hidden gold, quiz, examples; DICOM or JPEG/PNG) leaves through
one function, ``display_png``: the same min-max contrast stretch before and after shrinking, so every
PNG spans 0-255 and pixel statistics cannot tell hidden gold from work (issue 22, item 4).

Burned-in text (names printed into the pixels by some modalities) is NOT removed: ingest only
accepts CR/DX, where it is rare; docs/labeling-job.md says what to do about it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from urllib.parse import unquote, urlparse

import numpy as np
from PIL import Image

from services.core.imaging import display_array, png_gray8, read_dicom


def path_from_uri(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        raise ValueError(f"unsupported storage URI scheme {parsed.scheme!r}")
    return Path(unquote(parsed.path))


def _stretch(arr: np.ndarray) -> np.ndarray:
    """Min-max contrast stretch to [0, 1] (a flat image becomes all 0)."""
    arr = np.asarray(arr, dtype=np.float32)
    lo, hi = float(np.min(arr)), float(np.max(arr))
    return (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)


def display_png(arr: np.ndarray, max_side: int) -> bytes:
    """The one rendering path for every image shown to annotators: stretch to the full 8-bit range,
    shrink to max_side, stretch again (resampling can soften the extremes), encode."""
    pixels = (_stretch(arr) * 255.0 + 0.5).astype(np.uint8)
    if max_side and max(pixels.shape) > max_side:
        img = Image.fromarray(pixels, mode="L")
        img.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        pixels = (_stretch(np.asarray(img)) * 255.0 + 0.5).astype(np.uint8)
    return png_gray8(pixels)


def render_dicom(path: Path, max_side: int) -> bytes:
    return display_png(display_array(read_dicom(path)), max_side)


def render_picture(path: Path, max_side: int) -> bytes:
    """Gold images from the public data set (JPEG/PNG files): the same stretch as DICOM work images."""
    with Image.open(path) as img:
        arr = np.asarray(img.convert("L"), dtype=np.float32)  # raw grey levels, as display_array reads DICOM
    return display_png(arr, max_side)


def is_dicom_path(source: Path) -> bool:
    """Stored DICOM (the image store's files, .dcm) rather than a JPEG/PNG picture (gold, add-images)."""
    return source.suffix.lower() in ("", ".dcm", ".dicom")


def render_source(source: Path, max_side: int) -> bytes:
    if is_dicom_path(source):
        return render_dicom(source, max_side)
    return render_picture(source, max_side)


def cached_png(cache_dir: Path, task_id: str, source: Path, max_side: int, display: np.ndarray | None = None) -> Path:
    """The task's PNG in the cache, rendering it first if needed (atomic write). ``display``: the
    source's pixels when the caller has decoded them already (services/labeling/intake.py): rendered
    from them rather than read again."""
    target = cache_dir / f"{task_id}.png"
    if target.exists():
        return target
    data = display_png(display, max_side) if display is not None else render_source(source, max_side)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, target)
    return target
