"""Class-activation heatmaps as overlay-ready PNGs.

The network's CAM covers the square, padded model input. `content_box` gives where the image sits
on that square (the same arithmetic as preprocess.resize_to_fit; a unit test keeps them in step),
so the map is cropped to the image, resized to the image's aspect (longest side `max_side`) and
written as a PNG with a colour+alpha palette: colour from the "inferno" map, alpha growing with
the evidence FOR pneumonia (positive CAM values; negative evidence is transparent). A viewer
stretches it over the image. The CAM's raw range and the model version are kept in PNG text chunks. Writes are atomic.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

MAX_ALPHA = 0.65
# The CAM has ~12 x 12 cells: a small PNG carries all of it, and viewers stretch it over the image
# with smooth (bilinear) scaling. Fast zlib level: PNG encoding was the costliest step per image.
MAX_SIDE = 160
COMPRESS_LEVEL = 1


def _inferno_lut() -> np.ndarray:
    from matplotlib import colormaps

    return (colormaps["inferno"](np.linspace(0.0, 1.0, 256))[:, :3] * 255.0 + 0.5).astype(np.uint8)


_LUT: np.ndarray | None = None
_ALPHA = bytes(round(i / 255.0 * MAX_ALPHA * 255.0) for i in range(256))


def content_box(rows: int, columns: int, size: int) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a rows x columns image on the size x size model input."""
    scale = size / max(rows, columns)
    h, w = max(1, round(rows * scale)), max(1, round(columns * scale))
    return (size - h) // 2, (size - w) // 2, h, w


def render_heatmap(cam: np.ndarray, rows: int, columns: int, input_size: int, max_side: int = MAX_SIDE) -> Image.Image:
    """Heatmap of `cam` [h, w] for a rows x columns image, longest side max_side: a palette image
    whose entries carry colour and alpha (`.convert("RGBA")` gives the RGBA view)."""
    global _LUT
    if _LUT is None:
        _LUT = _inferno_lut()
    cam = np.asarray(cam, dtype=np.float32)
    full = np.asarray(
        Image.fromarray(cam, mode="F").resize((input_size, input_size), Image.Resampling.BILINEAR), dtype=np.float32
    )
    top, left, h, w = content_box(rows, columns, input_size)
    crop = full[top : top + h, left : left + w]
    scale = min(1.0, max_side / max(rows, columns))
    out_w, out_h = max(1, round(columns * scale)), max(1, round(rows * scale))
    crop = np.asarray(Image.fromarray(crop, mode="F").resize((out_w, out_h), Image.Resampling.BILINEAR), np.float32)
    peak = float(np.max(cam))
    level = np.clip(crop / peak, 0.0, 1.0) if peak > 0 else np.zeros_like(crop)
    # a palette image (colour and alpha per level): a quarter of RGBA's bytes, ~4x faster to encode
    img = Image.fromarray((level * 255.0 + 0.5).astype(np.uint8), mode="P")
    img.putpalette(_LUT.reshape(-1).tolist(), rawmode="RGB")
    img.info["transparency"] = _ALPHA
    return img


def heatmap_path(root: Path, sop_instance_uid: str, model_name: str, model_version: str) -> Path:
    digest = hashlib.sha256(sop_instance_uid.encode()).hexdigest()
    safe_uid = "".join(c for c in sop_instance_uid if c.isdigit() or c == ".")[:64] or digest[:16]
    return root / digest[:2] / f"{safe_uid}_{model_name}-v{model_version}.png"


def save_heatmap(
    root: Path,
    sop_instance_uid: str,
    cam: np.ndarray,
    rows: int,
    columns: int,
    input_size: int,
    model_name: str,
    model_version: str,
    max_side: int = MAX_SIDE,
) -> str:
    """Write the heatmap PNG (atomically) and return its file:// URI."""
    path = heatmap_path(_resolved(root), sop_instance_uid, model_name, model_version)
    image = render_heatmap(cam, rows, columns, input_size, max_side)
    info = PngImagePlugin.PngInfo()
    info.add_text("pt:cam_min", f"{float(np.min(cam)):.6g}")
    info.add_text("pt:cam_max", f"{float(np.max(cam)):.6g}")
    info.add_text("pt:model", f"{model_name}:{model_version}")
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info, compress_level=COMPRESS_LEVEL, transparency=_ALPHA)
    try:  # the directory usually exists: make it only when it is missing (first image, or pruned)
        fd, tmp = tempfile.mkstemp(prefix=".hm-", dir=path.parent)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".hm-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path.as_uri()


# Each root's resolved path, once per process (resolving costs a system call per path component).
@functools.lru_cache(maxsize=16)
def _resolved(root: Path) -> Path:
    return Path(root).resolve()
