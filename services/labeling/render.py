"""PHI-free images for the browser: only pixels are rendered (no header field ever reaches a page),
windowed to display range, shrunk, cached as PNG under the render directory by opaque task id.

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

from services.core.imaging import display_array, read_dicom, to_png


def path_from_uri(uri: str) -> Path:
    parsed = urlparse(uri)
    if parsed.scheme not in ("file", ""):
        raise ValueError(f"unsupported storage URI scheme {parsed.scheme!r}")
    return Path(unquote(parsed.path))


def render_dicom(path: Path, max_side: int) -> bytes:
    return to_png(display_array(read_dicom(path)), max_side=max_side)


def render_picture(path: Path, max_side: int) -> bytes:
    """Gold images from the public data set (JPEG/PNG files)."""
    with Image.open(path) as img:
        arr = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return to_png(arr, max_side=max_side)


def render_source(source: Path, max_side: int) -> bytes:
    if source.suffix.lower() in (".dcm", "") or source.suffix.lower() == ".dicom":
        return render_dicom(source, max_side)
    return render_picture(source, max_side)


def cached_png(cache_dir: Path, task_id: str, source: Path, max_side: int) -> Path:
    """The task's PNG in the cache, rendering it first if needed (atomic write)."""
    target = cache_dir / f"{task_id}.png"
    if target.exists():
        return target
    data = render_source(source, max_side)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, suffix=".tmp")
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, target)
    return target
