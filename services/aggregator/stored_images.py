"""The X-ray files ingest stored, found by their storage URI (``file://...``): path and header."""

from __future__ import annotations

import functools
import io
import logging
from pathlib import Path
from urllib.parse import unquote, urlparse

from pydicom.dataset import Dataset

log = logging.getLogger(__name__)


def path_of(storage_uri: str) -> Path | None:
    if not storage_uri:
        return None
    parsed = urlparse(storage_uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def read_header(storage_uri: str) -> Dataset | None:
    """The stored image's header (no pixels), or None when it cannot be read."""
    from services.core.imaging import read_dicom

    path = path_of(storage_uri)
    if path is None or not path.is_file():
        return None
    try:
        return read_dicom(path, stop_before_pixels=True)
    except Exception:  # a missing or unreadable file must not break the result
        log.warning("cannot read stored header", extra={"error": "unreadable file"})
        return None


@functools.lru_cache(maxsize=256)
def heatmap_png(path: str, mtime: float) -> bytes:
    """A heatmap file as a transparent colour PNG (.npy arrays are colour-mapped; PNGs pass through).

    (Shared by the worklist's heatmap endpoint and the heatmap Secondary Capture.)"""
    if not path.endswith(".npy"):
        return Path(path).read_bytes()
    import numpy as np
    from matplotlib import colormaps
    from PIL import Image as PILImage

    arr = np.asarray(np.load(path), dtype=np.float32).squeeze()
    lo, hi = float(arr.min()), float(arr.max())
    arr = (arr - lo) / (hi - lo) if hi > lo else np.zeros_like(arr)
    rgba = (colormaps["jet"](arr) * 255).astype(np.uint8)
    rgba[..., 3] = (np.clip(arr, 0, 1) * 255).astype(np.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    return buf.getvalue()
