"""Input gate: may the model judge this image at all? (and so: may the crowd be paid to judge it)

One place for the gate's image rules, used by inference (every prediction carries the verdict) and
by labeling (a refused image never becomes a crowd task; a borderline one is marked in the export).
What stays with inference: the verdict's fields in ``Prediction``, its metrics, and the fitting
tools (``services/inference/tools/gate_fit.py``, ``pneumotriage model gate-fit``).

Headers lie (a DX / CHEST / PA tag on an MR slice, a test pattern, a thumbnail), and the CNN answers
with a confident P(pneumonia) whatever it is shown. Before any flag, the gate looks at the decoded
pixels and the header and says:

* ``ok``          the image looks like something the model was made for;
* ``borderline``  it may be, but something is off (small, odd field of view, low gate score): the
                  aggregator makes it UNCERTAIN (a radiologist looks first, no automatic flag);
                  labeling makes a task and marks it in the export;
* ``refuse``      it is not something the model may judge: NOT_TRIAGED with the reason; labeling
                  makes no task (counted and listed on the owner page).

Three kinds of checks, each with a human-readable reason:

1. header rules: a modality that is not a projection radiograph (CT, MR, US, NM, ...), a colour image;
2. size rules: too few pixels (``min_side_px``), an aspect ratio no chest film has, and, when the
   header gives PixelSpacing / ImagerPixelSpacing, a physical field of view too small or too large
   for a chest;
3. a learned "frontal chest radiograph" score: a logistic regression on features of the display
   image that do not depend on bit depth, window, photometric interpretation or aspect ratio
   (rank-equalised 16 x 16 layout, left-right symmetry, the column/row profile, texture and
   histogram statistics), trained against negatives (pydicom's CT/MR/NM/US/SC files, synthetic
   patterns, noise, crops, inverted and rotated chests). It is independent of the pneumonia model:
   a new model version does not need a new gate. Re-fit with ``pneumotriage model gate-fit``.

The artifact (``gate_model.json`` next to this file) holds the feature scaler, the weights, the
thresholds and how they were measured. Pure numpy + Pillow at serving time.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

DEFAULT_GATE_FILE = Path(__file__).resolve().with_name("gate_model.json")

OK, BORDERLINE, REFUSE = "ok", "borderline", "refuse"
_ORDER = {OK: 0, BORDERLINE: 1, REFUSE: 2}
# The rule behind a finding: a short, fixed name (a metric label; the reason text carries the detail).
CHECKS = ("modality", "colour", "field_of_view", "size", "aspect", "blank", "score", "error")

# Modalities whose pixels are never a projection chest radiograph.
NON_RADIOGRAPH_MODALITIES = frozenset(
    {"CT", "MR", "US", "NM", "PT", "RTDOSE", "RTIMAGE", "RTSTRUCT", "SEG", "MG", "XA", "RF", "ES", "OP", "SM", "IVUS"}
    | {"OCT", "ECG", "SR", "KO", "PR", "DOC", "GM", "XC", "OPT", "BMD", "PX", "IO", "TG"}
)

LAYOUT = 16  # side of the equalised layout grid
PREVIEW_SIDE = 256  # gate_image subsamples larger images to about this (shorter side) first
N_FEATURES = LAYOUT * LAYOUT + 2 * LAYOUT + 16


@dataclass(frozen=True)
class GateRules:
    min_side_px: int = 128  # below: refuse ("too small to read")
    borderline_side_px: int = 192  # below: borderline (upsampled to the model's input)
    max_aspect: float = 2.0  # longer / shorter side above this: refuse
    borderline_aspect: float = 1.6
    min_extent_mm: float = 80.0  # the longer side of the field of view, when Pixel Spacing is known
    borderline_extent_mm: float = 120.0
    max_extent_mm: float = 800.0
    min_contrast: float = 0.02  # std of the display image below this: blank


@dataclass
class GateVerdict:
    verdict: str  # ok | borderline | refuse
    reason: str = ""
    score: float | None = None  # learned P(frontal chest radiograph), None when not computed
    version: str = ""
    findings: list[tuple[str, str, str]] = field(default_factory=list)  # (verdict, reason, check)
    check: str = ""  # the rule behind ``reason`` (one of CHECKS; "" when ok)

    def worse(self, verdict: str, reason: str, check: str) -> None:
        self.findings.append((verdict, reason, check))
        if _ORDER[verdict] > _ORDER[self.verdict]:
            self.verdict = verdict
        # the reason shown: the first finding with the worst verdict
        self.reason, self.check = next((r, c) for v, r, c in self.findings if v == self.verdict)


def _resize(gray: np.ndarray, h: int, w: int) -> np.ndarray:
    img = Image.fromarray(np.asarray(gray, dtype=np.float32), mode="F")
    return np.asarray(img.resize((w, h), Image.Resampling.BOX), dtype=np.float32)


def _equalise(a: np.ndarray) -> np.ndarray:
    """Ranks in [0, 1]: invariant to any monotone intensity change (window, gamma, bit depth)."""
    flat = a.ravel()
    ranks = np.empty(flat.size, dtype=np.float64)
    ranks[np.argsort(flat, kind="stable")] = np.arange(flat.size)
    return (ranks / max(flat.size - 1, 1)).reshape(a.shape)


def features(gray: np.ndarray) -> np.ndarray:
    """Feature vector of a display image (2D, [0, 1], bright = dense). Aspect is removed by
    squashing to a square (the size rules look at aspect separately)."""
    g = np.asarray(gray, dtype=np.float32)
    if g.ndim != 2 or min(g.shape) < 2:
        raise ValueError(f"expected a 2D image, got {g.shape}")
    small = _resize(g, 64, 64)
    eq64 = _equalise(small)
    layout = _resize(eq64.astype(np.float32), LAYOUT, LAYOUT).astype(np.float64)
    centred = layout - layout.mean()
    mirror = centred[:, ::-1]
    denom = math.sqrt(float((centred**2).sum() * (mirror**2).sum())) or 1.0
    symmetry = float((centred * mirror).sum() / denom)
    flipped = centred[::-1, :]
    vsym = float((centred * flipped).sum() / denom)
    cols = layout.mean(axis=0)
    rows = layout.mean(axis=1)
    # texture and histogram on the (window-dependent) display image, normalised by its own spread
    s = small.astype(np.float64)
    spread = float(s.std())
    z = (s - s.mean()) / max(spread, 1e-3)
    gx = np.abs(np.diff(z, axis=1)).mean()
    gy = np.abs(np.diff(z, axis=0)).mean()
    hist = np.histogram(np.clip(g[:: max(1, g.shape[0] // 256), :: max(1, g.shape[1] // 256)], 0, 1), bins=32)[0]
    p = hist / max(hist.sum(), 1)
    entropy = float(-(p[p > 0] * np.log2(p[p > 0])).sum()) / 5.0
    top_bin = float(p.max())
    dark = float((s < 0.05).mean())
    bright = float((s > 0.95).mean())
    q = np.quantile(s, [0.05, 0.5, 0.95])
    # synthetic images have long straight edges and few grey levels; radiographs have neither
    ax = np.abs(np.diff(z, axis=1)).mean(axis=0)
    ay = np.abs(np.diff(z, axis=0)).mean(axis=1)
    straight_v = float(ax.max() / max(float(ax.mean()), 1e-6))
    straight_h = float(ay.max() / max(float(ay.mean()), 1e-6))
    levels = np.unique(np.round(s * 255).astype(np.int32), return_counts=True)[1]
    top8 = float(np.sort(levels)[-8:].sum() / s.size)
    peaks = int(((p[1:-1] > p[:-2]) & (p[1:-1] > p[2:]) & (p[1:-1] > 0.02)).sum())
    centre = float(layout[:, LAYOUT // 2 - 2 : LAYOUT // 2 + 2].mean())
    sides = float(np.concatenate([layout[:, 2:5], layout[:, -5:-2]], axis=1).mean())
    extra = np.array(
        [
            symmetry,
            vsym,
            min(gx, 3.0),
            min(gy, 3.0),
            entropy,
            top_bin,
            dark,
            bright,
            float(q[1] - q[0]),
            float(q[2] - q[1]),
            min(spread * 4.0, 2.0),
            centre - sides,
            min(straight_v, 20.0) / 10.0,
            min(straight_h, 20.0) / 10.0,
            top8,
            min(peaks, 10) / 5.0,
        ]
    )
    return np.concatenate([layout.ravel(), cols, rows, extra])


@dataclass
class GateModel:
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray  # output layer weights
    intercept: float
    refuse_below: float
    borderline_below: float
    version: str = "gate-1"
    rules: GateRules = field(default_factory=GateRules)
    meta: dict[str, Any] = field(default_factory=dict)
    # hidden ReLU layers (weights [in, out], biases [out]); none = logistic regression
    hidden: list[tuple[np.ndarray, np.ndarray]] = field(default_factory=list)

    def score(self, gray: np.ndarray) -> float:
        x = (features(gray) - self.mean) / self.scale
        for w, b in self.hidden:
            x = np.maximum(x @ w + b, 0.0)
        z = float(x @ self.coef + self.intercept)
        return 1.0 / (1.0 + math.exp(-max(-50.0, min(50.0, z))))

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "n_features": int(self.mean.size),
            "refuse_below": self.refuse_below,
            "borderline_below": self.borderline_below,
            "rules": vars(self.rules),
            "intercept": self.intercept,
            "mean": [round(float(v), 6) for v in self.mean],
            "scale": [round(float(v), 6) for v in self.scale],
            "coef": [round(float(v), 6) for v in self.coef],
            "hidden": [
                {"w": [[round(float(v), 6) for v in row] for row in w], "b": [round(float(v), 6) for v in b]}
                for w, b in self.hidden
            ],
            "meta": self.meta,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GateModel:
        coef = np.asarray(d["coef"], dtype=np.float64)
        mean = np.asarray(d["mean"], dtype=np.float64)
        if mean.size != N_FEATURES:
            raise ValueError(f"gate model expects {mean.size} features, this code computes {N_FEATURES}")
        return cls(
            mean=mean,
            scale=np.asarray(d["scale"], dtype=np.float64),
            coef=coef,
            intercept=float(d["intercept"]),
            refuse_below=float(d["refuse_below"]),
            borderline_below=float(d["borderline_below"]),
            version=str(d.get("version", "gate")),
            rules=GateRules(**dict(d.get("rules", {}))),
            meta=dict(d.get("meta", {})),
            hidden=[
                (np.asarray(h["w"], dtype=np.float64), np.asarray(h["b"], dtype=np.float64))
                for h in d.get("hidden", [])
            ],
        )

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: Path) -> GateModel:
        return cls.from_dict(json.loads(Path(path).read_text()))


@lru_cache(maxsize=4)
def load_gate(path: str) -> GateModel:
    """The gate model, loaded once per process (and per decode process)."""
    return GateModel.load(Path(path))


def _spacing_mm(ds: Any) -> tuple[float, float] | None:
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        value = getattr(ds, keyword, None) if ds is not None else None
        try:
            if value is not None and len(value) == 2:
                row, col = float(value[0]), float(value[1])
                if row > 0 and col > 0 and math.isfinite(row) and math.isfinite(col):
                    return row, col
        except (TypeError, ValueError):
            continue
    return None


def _is_colour(ds: Any) -> bool:
    if ds is None or int(getattr(ds, "SamplesPerPixel", 1) or 1) < 3:
        return False
    try:
        rgb = np.asarray(ds.pixel_array, dtype=np.float32)
    except Exception:
        return False
    if rgb.ndim == 4:
        rgb = rgb[0]
    if rgb.ndim != 3 or rgb.shape[-1] < 3:
        return False
    if str(getattr(ds, "PhotometricInterpretation", "")).upper().startswith("YBR"):
        chroma = np.abs(rgb[..., 1:3] - np.median(rgb[..., 1:3])).mean()
        return bool(chroma > 0.03 * max(float(rgb[..., 0].max()), 1.0))
    spread = np.abs(rgb[..., 0] - rgb[..., 1]).mean() + np.abs(rgb[..., 1] - rgb[..., 2]).mean()
    return bool(spread > 0.03 * max(float(rgb.max()), 1.0))


def assess(
    gray: np.ndarray, ds: Any = None, model: GateModel | None = None, shape: tuple[int, int] | None = None
) -> GateVerdict:
    """The gate's verdict for one decoded display image (and its header, when there is one).
    ``shape``: the full image's (rows, columns) when ``gray`` is a subsampled preview."""
    rules = model.rules if model is not None else GateRules()
    out = GateVerdict(OK, version=model.version if model is not None else "rules")
    modality = str(getattr(ds, "Modality", "") or "").upper() if ds is not None else ""
    if modality in NON_RADIOGRAPH_MODALITIES:
        out.worse(REFUSE, f"modality {modality} is not a chest radiograph", "modality")
    if _is_colour(ds):
        out.worse(REFUSE, "colour image: not a chest radiograph", "colour")
    rows, cols = (int(shape[0]), int(shape[1])) if shape else (int(gray.shape[0]), int(gray.shape[1]))
    size = f"{cols} × {rows} px"
    spacing = _spacing_mm(ds)
    if spacing is not None:
        h_mm, w_mm = rows * spacing[0], cols * spacing[1]
        size += f", {w_mm:.0f} × {h_mm:.0f} mm"
        extent = max(h_mm, w_mm)
        if extent < rules.min_extent_mm:
            out.worse(REFUSE, f"too small to read: field of view {size} is smaller than a chest", "field_of_view")
        elif extent < rules.borderline_extent_mm:
            out.worse(BORDERLINE, f"small field of view ({size}) for a chest radiograph", "field_of_view")
        elif extent > rules.max_extent_mm:
            out.worse(REFUSE, f"field of view {size} is larger than a chest radiograph", "field_of_view")
    if min(rows, cols) < rules.min_side_px:
        out.worse(REFUSE, f"too small to read ({size}; at least {rules.min_side_px} px per side needed)", "size")
    elif min(rows, cols) < rules.borderline_side_px:
        out.worse(BORDERLINE, f"low resolution ({size})", "size")
    aspect = max(rows, cols) / max(min(rows, cols), 1)
    if aspect > rules.max_aspect:
        out.worse(REFUSE, f"aspect ratio {aspect:.1f}:1 ({size}) does not look like a chest radiograph", "aspect")
    elif aspect > rules.borderline_aspect:
        out.worse(BORDERLINE, f"unusual aspect ratio {aspect:.1f}:1 ({size})", "aspect")
    if min(rows, cols) >= 2 and float(np.std(gray)) < rules.min_contrast:
        out.worse(REFUSE, "blank or nearly uniform image", "blank")
    if model is not None and min(rows, cols) >= 2:
        score = model.score(gray)
        out.score = score
        if score < model.refuse_below:
            out.worse(REFUSE, f"does not look like a frontal chest radiograph (gate score {score:.2f})", "score")
        elif score < model.borderline_below:
            out.worse(BORDERLINE, f"may not be a frontal chest radiograph (gate score {score:.2f})", "score")
    if out.verdict == OK:
        out.reason = out.check = ""
    return out


def assess_dataset(ds: Any, model: GateModel | None, display: np.ndarray | None = None) -> GateVerdict:
    """The verdict for a decoded DICOM data set, from a subsampled display preview (the features need
    ~64 px; the full-size display image is the preprocessing's job). ``display``: the full-size
    display image of frame 0 when the caller has it already; it is the preview itself when no
    subsampling is due (shorter side under 2 x PREVIEW_SIDE), which saves decoding it twice."""
    from services.core.imaging import display_array

    rows, cols = int(ds.Rows), int(ds.Columns)
    step = max(1, min(rows, cols) // PREVIEW_SIDE)
    if step == 1 and display is not None and display.shape == (rows, cols):
        preview = display
    else:
        preview = display_array(ds, step=step)
    return assess(preview, ds, model, shape=(rows, cols))


def gate_image(ds: Any, gate_file: str, display: np.ndarray | None = None) -> GateVerdict:
    """The verdict for a decoded DICOM data set (in a decode thread or process). A gate that fails
    must not stop triage: the image becomes borderline (UNCERTAIN) with the reason."""
    try:
        return assess_dataset(ds, load_gate(gate_file), display)
    except Exception as exc:  # never lose a prediction to the gate itself
        reason = f"input gate could not assess the image ({type(exc).__name__})"
        return GateVerdict(BORDERLINE, reason, version="error", check="error")
