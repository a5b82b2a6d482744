"""The input gate's test corpora (services/core/gate.py), shared by the inference and labeling end-to-end
tests: DICOM files whose header says DX / CHEST / PA but whose pixels are something the model may not
judge, and real chest X-rays in the forms a site sends them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom

from services.inference.tools.gate_fit import bundled_dicom_images, chest_dicom, load_gray, resize


def non_chest_corpus(shared_data: Path) -> list[tuple[str, bytes]]:
    """(name, DICOM bytes) with a lying chest header; pixels at their own size."""
    out: list[tuple[str, bytes]] = []
    wanted = ("CT_small", "MR_small.dcm", "693_J2KI", "JPEG2000.dcm", "examples_overlay", "examples_rgb", "RTImage")
    for name, arr in bundled_dicom_images():
        if any(name.startswith(w) for w in wanted) and name.endswith("#0"):
            out.append((name, chest_dicom(arr)))
    rng = np.random.default_rng(2024)
    yy, xx = np.mgrid[0:10, 0:10]
    out.append(("test pattern 10x10", chest_dicom(((xx + yy) % 2).astype(np.float32))))
    out.append(("128x128 image", chest_dicom(rng.random((128, 128)).astype(np.float32) ** 2)))
    out.append(("noise 512", chest_dicom(rng.random((512, 512)).astype(np.float32))))
    out.append(("gradient 400x300", chest_dicom(np.tile(np.linspace(0, 1, 300, dtype=np.float32), (400, 1)))))
    chest = load_gray(sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[3])
    out.append(("inverted chest", chest_dicom(1.0 - chest)))
    out.append(("rotated chest", chest_dicom(np.ascontiguousarray(np.rot90(chest)))))
    return out


def with_pixel_spacing(raw: bytes, mm: float) -> bytes:
    """The same file claiming `mm` per pixel (Pixel Spacing), i.e. another physical field of view."""
    ds = pydicom.dcmread(io.BytesIO(raw))
    ds.PixelSpacing = [f"{mm:.4f}", f"{mm:.4f}"]
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def refusal_corpus(shared_data: Path) -> list[tuple[str, bytes]]:
    """What the gate must refuse, by each of its rules (issue 29: the images labeling made crowd work of):
    too few pixels (10 x 10, 10 x 45, 10 x 50, 64 x 64), an aspect no chest film has (1024 x 256), a
    field of view larger than a chest, blank, and pixels that are not a frontal chest radiograph."""
    rng = np.random.default_rng(29)
    chest = load_gray(sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[5])
    out = [
        ("10 x 10", chest_dicom(rng.random((10, 10)).astype(np.float32))),
        ("10 x 45", chest_dicom(rng.random((45, 10)).astype(np.float32))),
        ("10 x 50", chest_dicom(rng.random((10, 50)).astype(np.float32))),
        ("64 x 64 chest thumbnail", chest_dicom(resize(chest, 64, 64))),
        ("1024 x 256 chest strip", chest_dicom(resize(chest, 256, 1024))),
        ("field of view 1.2 m", with_pixel_spacing(chest_dicom(chest), 1200.0 / 224)),
        ("blank", chest_dicom(np.full((256, 256), 0.5, dtype=np.float32))),
        ("noise 512", chest_dicom(rng.random((512, 512)).astype(np.float32))),
        ("inverted chest", chest_dicom(1.0 - chest)),
    ]
    return out


def borderline_corpus(shared_data: Path) -> list[tuple[str, bytes]]:
    """Chest X-rays the gate lets through with a mark: low resolution, a small field of view."""
    chest = load_gray(sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("*.jpeg"))[7])
    return [
        ("chest at 160 px", chest_dicom(resize(chest, 160, 160))),
        ("chest, 100 mm field of view", with_pixel_spacing(chest_dicom(chest), 100.0 / 224)),
    ]


def chest_corpus(shared_data: Path) -> list[tuple[str, bytes]]:
    """Real chest X-rays: the twelve DICOM files of ../shared, and training images as 12-bit
    MONOCHROME1 and at a true (not squashed) aspect ratio."""
    out = [(p.name, p.read_bytes()) for p in sorted((shared_data / "dicom").glob("*.dcm"))]
    jpegs = sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("*.jpeg"))[:4]
    for p in jpegs:
        a = load_gray(p)
        out.append((f"{p.name} 12-bit MONOCHROME1", chest_dicom(a, bits=12, photometric="MONOCHROME1")))
        out.append((f"{p.name} true aspect", chest_dicom(resize(a, 272, 224), bits=16)))
    return out
