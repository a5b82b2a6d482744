"""Fit and measure the input gate (``pneumotriage model gate-fit`` / ``model gate-evaluate``).

Positives: the chest radiographs of the training split (``split.json``), each also seen through
the changes a real site brings (other aspect ratios, crops, small rotations, gamma, borders and
burnt-in labels, noise, blur, left-right flip). Negatives: the 2D images bundled with pydicom and
pynetdicom (CT, MR, NM, US, secondary captures; resized so that size alone gives nothing away),
synthetic patterns and noise, and chests that are not frontal chest radiographs as shown: inverted
(MONOCHROME1 tagged MONOCHROME2), rotated 90°/180°, small crops, mosaics.

Thresholds: ``refuse_below`` and ``borderline_below`` are quantiles of the scores of chest images
the logistic regression was NOT fitted on (a group-aware fold of the training patients), so that
the expected false-refusal rate is ``refuse_quantile`` (default 0.3 %) and the borderline rate
``borderline_quantile``. The val/test patients are never used: ``gate-evaluate`` measures on them.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from services.core.gate import GateModel, GateRules, assess, assess_dataset, features
from services.inference.tools.progress import tracked

if TYPE_CHECKING:
    from rich.progress import Progress


def load_gray(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.float32) / 255.0


def resize(a: np.ndarray, h: int, w: int) -> np.ndarray:
    img = Image.fromarray(np.asarray(a, dtype=np.float32), mode="F")
    return np.clip(np.asarray(img.resize((w, h), Image.Resampling.BILINEAR), dtype=np.float32), 0, 1)


def rotate(a: np.ndarray, degrees: float, fill: float) -> np.ndarray:
    img = Image.fromarray(np.asarray(a, dtype=np.float32), mode="F")
    return np.asarray(img.rotate(degrees, Image.Resampling.BILINEAR, fillcolor=fill), dtype=np.float32)


def blur(a: np.ndarray, k: int) -> np.ndarray:
    h, w = a.shape
    return resize(resize(a, max(2, h // k), max(2, w // k)), h, w)


# ---- positives: what a chest radiograph from another site may look like ------------------------
def site_variant(a: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A plausible chest radiograph from another site, made from one training image."""
    h, w = a.shape
    out = a
    if rng.random() < 0.5:  # another aspect ratio (true aspect instead of the squashed copy)
        f = float(rng.uniform(0.75, 1.33))
        out = resize(out, int(h * f), w) if rng.random() < 0.5 else resize(out, h, int(w / f))
    if rng.random() < 0.5:  # tighter collimation / crop
        hh, ww = out.shape
        c = float(rng.uniform(0.8, 0.97))
        ch, cw = int(hh * c), int(ww * c)
        top, left = int(rng.integers(0, hh - ch + 1)), int(rng.integers(0, ww - cw + 1))
        out = out[top : top + ch, left : left + cw]
    if rng.random() < 0.4:  # wider field of view: a border (black or white)
        hh, ww = out.shape
        pad = int(max(hh, ww) * rng.uniform(0.03, 0.12))
        canvas = np.full((hh + 2 * pad, ww + 2 * pad), float(rng.choice([0.0, 1.0])), dtype=np.float32)
        canvas[pad : pad + hh, pad : pad + ww] = out
        out = canvas
    if rng.random() < 0.4:
        out = rotate(out, float(rng.uniform(-10, 10)), float(out.min()))
    if rng.random() < 0.6:  # another detector / window: gamma and contrast
        out = np.clip(out, 0, 1) ** float(rng.uniform(0.5, 2.0))
        lo, hi = float(rng.uniform(0, 0.15)), float(rng.uniform(0.85, 1.0))
        out = np.clip((out - lo) / (hi - lo), 0, 1)
    if rng.random() < 0.3:  # burnt-in label
        hh, ww = out.shape
        bh, bw = int(hh * rng.uniform(0.04, 0.1)), int(ww * rng.uniform(0.1, 0.3))
        top = int(rng.choice([rng.integers(0, hh // 8 + 1), hh - bh - 1]))
        left = int(rng.integers(0, ww - bw))
        out = out.copy()
        out[top : top + bh, left : left + bw] = 1.0
    if rng.random() < 0.3:
        out = np.clip(out + rng.normal(0, rng.uniform(0.01, 0.05), out.shape), 0, 1)
    if rng.random() < 0.2:
        out = blur(out, int(rng.integers(2, 4)))
    if rng.random() < 0.5:
        out = out[:, ::-1]
    return np.ascontiguousarray(out, dtype=np.float32)


# ---- negatives -------------------------------------------------------------------------------
def bundled_dicom_images() -> list[tuple[str, np.ndarray]]:
    """2D display images of the DICOM files bundled with pydicom and pynetdicom (none is a chest X-ray)."""
    import warnings

    import pydicom
    from pydicom.data import get_testdata_file

    from services.core.imaging import display_array

    folders = [os.path.dirname(str(get_testdata_file("CT_small.dcm")))]
    try:
        import pynetdicom

        folders.append(os.path.join(os.path.dirname(pynetdicom.__file__), "tests", "dicom_files"))
    except ImportError:
        pass
    out: list[tuple[str, np.ndarray]] = []
    for folder in folders:
        for f in sorted(glob.glob(os.path.join(folder, "*.dcm"))):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    ds = pydicom.dcmread(f)
                    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
                    for frame in sorted({0, frames // 2}):
                        arr = display_array(ds, frame=frame)
                        if arr.ndim == 2 and min(arr.shape) >= 8 and float(arr.std()) > 0.01:
                            out.append((f"{os.path.basename(f)}#{frame}", arr))
                except Exception:
                    continue
    return out


def synthetic_negative(rng: np.random.Generator, size: int = 224) -> tuple[str, np.ndarray]:
    kind = str(
        rng.choice(["noise", "smooth_noise", "gradient", "checker", "bars", "circles", "pattern", "text", "blocks"])
    )
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind == "noise":
        a = rng.random((size, size))
    elif kind == "smooth_noise":
        a = blur(rng.random((size, size)).astype(np.float32), int(rng.integers(4, 32)))
    elif kind == "gradient":
        t = float(rng.uniform(0, np.pi))
        a = np.cos(t) * xx + np.sin(t) * yy
    elif kind == "checker":
        n = int(rng.integers(2, 20))
        a = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(float)
    elif kind == "bars":
        n = int(rng.integers(2, 30))
        a = (np.floor(xx * n) % 2) if rng.random() < 0.5 else (np.floor(yy * n) % 2)
    elif kind == "circles":
        a = np.zeros((size, size))
        for _ in range(int(rng.integers(1, 6))):
            cx, cy, r = rng.random(), rng.random(), rng.uniform(0.05, 0.4)
            a = np.maximum(a, ((xx - cx) ** 2 + (yy - cy) ** 2 < r * r) * rng.uniform(0.3, 1))
    elif kind == "pattern":  # a test pattern: grey steps + line pairs
        a = np.floor(xx * 10) / 10
        a[size // 3 : 2 * size // 3] = (np.sin(xx[size // 3 : 2 * size // 3] * rng.uniform(20, 200)) > 0) * 1.0
    elif kind == "text":  # a scanned document: white page, dark lines
        a = np.ones((size, size))
        for r in range(int(rng.integers(5, 25))):
            y = int(size * (r + 1) / 27)
            a[y : y + 3, int(size * 0.1) : int(size * rng.uniform(0.5, 0.9))] = rng.uniform(0, 0.3)
    else:
        n = int(rng.integers(2, 8))
        a = np.kron(rng.random((n, n)), np.ones((size // n + 1, size // n + 1)))[:size, :size]
    a = np.asarray(a, dtype=np.float32)
    a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
    if rng.random() < 0.5:
        a = np.clip(a + rng.normal(0, 0.05, a.shape), 0, 1)
    return kind, a.astype(np.float32)


def chest_negative(a: np.ndarray, rng: np.random.Generator) -> tuple[str, np.ndarray]:
    """A chest image that is not a frontal chest radiograph as shown."""
    kind = str(rng.choice(["inverted", "rot90", "rot180", "crop", "mosaic", "inverted_rot"]))
    if kind == "inverted":
        out = 1.0 - a
    elif kind == "rot90":
        out = np.rot90(a, int(rng.choice([1, 3])))
    elif kind == "rot180":
        out = a[::-1, :]
    elif kind == "crop":  # a small part of a chest, enlarged
        h, w = a.shape
        c = float(rng.uniform(0.2, 0.45))
        ch, cw = int(h * c), int(w * c)
        top, left = int(rng.integers(0, h - ch)), int(rng.integers(0, w - cw))
        out = resize(a[top : top + ch, left : left + cw], h, w)
    elif kind == "mosaic":
        half = resize(a, a.shape[0] // 2, a.shape[1] // 2)
        out = np.block([[half, half[:, ::-1]], [half[::-1, :], half]])
    else:
        out = np.rot90(1.0 - a, int(rng.choice([1, 3])))
    return kind, np.ascontiguousarray(out, dtype=np.float32)


# ---- data ------------------------------------------------------------------------------------
def chest_records(data: Path, splits: tuple[str, ...]) -> list:
    from services.inference.tools.training.dataset import scan_folder
    from services.inference.tools.training.split import assign, load_split

    parts = assign(scan_folder(data), load_split())
    return [r for s in splits for r in parts[s]]


@dataclass
class Corpus:
    x: np.ndarray
    y: np.ndarray
    group: np.ndarray  # patient (positives) or source (negatives): folds never split a group
    kind: list[str]


def build_corpus(
    data: Path, seed: int = 0, limit: int = 0, variants: int = 1, progress: Progress | None = None
) -> Corpus:
    rng = np.random.default_rng(seed)
    records = chest_records(data, ("train",))
    if limit:
        records = [records[i] for i in sorted(rng.choice(len(records), min(limit, len(records)), replace=False))]
    xs: list[np.ndarray] = []
    ys: list[int] = []
    groups: list[str] = []
    kinds: list[str] = []

    def add(arr: np.ndarray, label: int, group: str, kind: str) -> None:
        xs.append(features(arr))
        ys.append(label)
        groups.append(group)
        kinds.append(kind)

    for rec in tracked(progress, records, "features: training chests"):
        a = load_gray(rec.path)
        add(a, 1, rec.patient, "chest")
        for _ in range(variants):
            add(site_variant(a, rng), 1, rec.patient, "chest_variant")
        if rng.random() < 0.5:
            kind, neg = chest_negative(a, rng)
            add(neg, 0, f"chestneg:{rec.patient}", f"chest_{kind}")
    for name, arr in tracked(progress, bundled_dicom_images(), "features: DICOM negatives"):
        base = name.split("#")[0].split("_")[0]
        for i in range(6):
            side = int(rng.integers(192, 512))
            view = arr if i == 0 else (arr[:, ::-1] if i % 2 else np.rot90(arr, i % 4))
            view = resize(view, side, int(side * rng.uniform(0.8, 1.25)))
            if i >= 3:
                view = np.clip(view ** float(rng.uniform(0.5, 2.0)), 0, 1)
            add(view, 0, f"dicom:{base}", "dicom")
    for i in tracked(progress, range(max(600, len(records) // 4)), "features: synthetic negatives"):
        kind, arr = synthetic_negative(rng)
        add(arr, 0, f"synthetic:{i % 50}", f"synthetic_{kind}")
    return Corpus(np.vstack(xs), np.asarray(ys), np.asarray(groups), kinds)


def fit_gate(
    corpus: Corpus,
    seed: int = 0,
    c: float = 0.3,
    refuse_quantile: float = 0.003,
    borderline_quantile: float = 0.01,
    version: str = "gate-1",
    hidden: int = 0,
    progress: Progress | None = None,
) -> GateModel:
    """Logistic regression (or, with `hidden` > 0, a one-hidden-layer ReLU network); thresholds from
    chest images of held-out patients (5 group folds)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.neural_network import MLPClassifier

    def make() -> LogisticRegression | MLPClassifier:
        if hidden:
            return MLPClassifier((hidden,), alpha=1.0 / c, max_iter=400, early_stopping=True, random_state=seed)
        return LogisticRegression(C=c, max_iter=3000, class_weight="balanced")

    x, y = corpus.x, corpus.y
    mean = x.mean(axis=0)
    scale = np.maximum(x.std(axis=0), 1e-6)
    z = (x - mean) / scale
    oof = np.zeros(len(y))
    folds = list(GroupKFold(n_splits=5).split(z, y, groups=corpus.group))
    for step in tracked(progress, range(len(folds) + 1), f"fit: {len(folds)} group folds, then all"):
        clf = make()
        if step < len(folds):
            fit_idx, test_idx = folds[step]
            clf.fit(z[fit_idx], y[fit_idx])
            oof[test_idx] = clf.predict_proba(z[test_idx])[:, 1]
        else:
            clf.fit(z, y)
    if hidden:
        layers = [
            (np.asarray(w, dtype=np.float64), np.asarray(b, dtype=np.float64))
            for w, b in zip(clf.coefs_, clf.intercepts_, strict=True)
        ]
        hidden_layers, (w_out, b_out) = layers[:-1], layers[-1]
        coef, intercept = w_out[:, 0], float(b_out[0])
    else:
        hidden_layers, coef, intercept = [], clf.coef_[0].astype(np.float64), float(clf.intercept_[0])
    pos = oof[(y == 1)]
    refuse_below = float(np.quantile(pos, refuse_quantile))
    borderline_below = max(refuse_below, float(np.quantile(pos, borderline_quantile)))
    kinds = np.asarray(corpus.kind)
    per_kind = {
        k: {
            "n": int((kinds == k).sum()),
            "refused": round(float((oof[kinds == k] < refuse_below).mean()), 4),
            "borderline_or_refused": round(float((oof[kinds == k] < borderline_below).mean()), 4),
        }
        for k in sorted(set(corpus.kind))
    }
    meta = {
        "fitted_on": "training split chests (+ site variants) vs pydicom/pynetdicom files, synthetic patterns, "
        "inverted/rotated/cropped/mosaic chests",
        "n_positive": int(y.sum()),
        "n_negative": int((1 - y).sum()),
        "seed": seed,
        "C": c,
        "model": f"MLP({hidden}) ReLU" if hidden else "logistic regression",
        "refuse_quantile": refuse_quantile,
        "borderline_quantile": borderline_quantile,
        "out_of_fold_by_kind": per_kind,
    }
    return GateModel(
        mean=mean,
        scale=scale,
        coef=coef,
        intercept=intercept,
        refuse_below=refuse_below,
        borderline_below=borderline_below,
        version=version,
        rules=GateRules(),
        meta=meta,
        hidden=hidden_layers,
    )


# ---- measuring on images the gate never saw ------------------------------------------------------
def chest_dicom(gray: np.ndarray, bits: int = 8, photometric: str = "MONOCHROME2", jpeg: bool = False) -> bytes:
    """A DX file of a display image: 8/12/16-bit, MONOCHROME1/2, pixel spacing for a ~ 250 mm
    field of view, optionally JPEG baseline (a service never imports another: ingest's make-dicom
    is not used here)."""
    import io

    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.uid import (
        DigitalXRayImageStorageForPresentation,
        ExplicitVRLittleEndian,
        JPEGBaseline8Bit,
        generate_uid,
    )

    top = (1 << bits) - 1
    values = np.clip(gray, 0, 1)
    if photometric == "MONOCHROME1":
        values = 1.0 - values
    pixels = np.rint(values * top).astype(np.uint8 if bits == 8 else np.uint16)
    ds = Dataset()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    spacing = f"{250.0 / max(pixels.shape):.4f}"
    ds.PixelSpacing = [spacing, spacing]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (8 if bits == 8 else 16), bits, bits - 1, 0
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if jpeg and bits == 8:
        buf = io.BytesIO()
        Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=90)
        ds.PixelData = encapsulate([buf.getvalue()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
        ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    else:
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    out = io.BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


TRANSFORMS = ("mono2_8bit", "mono1_12bit", "16bit_large", "true_aspect", "jpeg")


def held_out_dicom(records: list, transform: str, rng: np.random.Generator) -> Iterator[tuple[object, np.ndarray]]:
    """Real DICOM round trip of held-out chests: 12-bit MONOCHROME1, 16-bit at detector size, true
    aspect, JPEG baseline (the header and display_array path the service uses)."""
    import io

    import pydicom

    from services.core.imaging import display_array

    for rec in records:
        a = load_gray(rec.path)
        if transform == "mono1_12bit":
            raw = chest_dicom(a, bits=12, photometric="MONOCHROME1")
        elif transform == "16bit_large":
            raw = chest_dicom(resize(a, 1024, 1024), bits=16)
        elif transform == "true_aspect":  # a portrait detector (35 x 43 cm) at its own aspect
            raw = chest_dicom(resize(a, int(a.shape[0] * float(rng.uniform(1.1, 1.3))), a.shape[1]), bits=12)
        else:
            raw = chest_dicom(a, jpeg=transform == "jpeg")
        ds = pydicom.dcmread(io.BytesIO(raw))
        yield ds, display_array(ds)


def evaluate_gate(
    model: GateModel, data: Path, limit: int = 0, seed: int = 0, progress: Progress | None = None
) -> dict[str, dict[str, float]]:
    """Refusal / borderline rates on the val+test chests (never used by gate-fit), as JPEG arrays
    and through DICOM with other bit depths, photometric interpretation and aspect; and on the
    non-chest corpus."""
    rng = np.random.default_rng(seed)
    records = chest_records(data, ("val", "test"))
    if limit:
        records = [records[i] for i in sorted(rng.choice(len(records), min(limit, len(records)), replace=False))]
    results: dict[str, dict[str, float]] = {}

    def tally(name: str, verdicts: list[str], reasons: list[str] | None = None) -> None:
        n = max(len(verdicts), 1)
        results[name] = {
            "n": len(verdicts),
            "refused": round(sum(v == "refuse" for v in verdicts) / n, 4),
            "borderline": round(sum(v == "borderline" for v in verdicts) / n, 4),
            "ok": round(sum(v == "ok" for v in verdicts) / n, 4),
        }

    tally(
        "chest_jpeg", [assess(load_gray(r.path), None, model).verdict for r in tracked(progress, records, "chest JPEG")]
    )
    tally(
        "chest_site_variant",
        [
            assess(site_variant(load_gray(r.path), rng), None, model).verdict
            for r in tracked(progress, records, "chest, other-site variant")
        ],
    )
    dicom_subset = records[: max(1, len(records) // 4)]
    for transform in TRANSFORMS:
        tally(
            f"chest_dicom_{transform}",
            [
                assess_dataset(ds, model).verdict
                for ds, _ in tracked(
                    progress,
                    held_out_dicom(dicom_subset, transform, rng),
                    f"chest DICOM {transform}",
                    len(dicom_subset),
                )
            ],
        )
    negatives = non_chest_corpus(seed + 1)
    tally("non_chest", [assess(arr, ds, model).verdict for _, ds, arr in tracked(progress, negatives, "non-chest")])
    return results


def non_chest_corpus(seed: int = 1) -> list[tuple[str, object, np.ndarray]]:
    """Non-chest images as the service would see them: with a header that claims DX / CHEST / PA
    (the header lies) at their own size, plus unseen synthetic patterns and tiny images."""
    from pydicom.dataset import Dataset

    rng = np.random.default_rng(seed)
    out: list[tuple[str, object, np.ndarray]] = []
    lying = Dataset()
    lying.Modality = "DX"
    for name, arr in bundled_dicom_images():
        out.append((name, lying, arr))
    for _ in range(100):
        kind, arr = synthetic_negative(rng, int(rng.integers(10, 600)))
        out.append((f"synthetic_{kind}", lying, arr))
    return out
