"""Evaluate the exported ONNX model with onnxruntime (no torch) on any folder laid out as NORMAL/ and
PNEUMONIA/ (JPEG, PNG or DICOM files).

Metrics: AUC, accuracy, sensitivity, specificity, PPV, NPV and F1 at the thresholds stored in the
model's metadata.json, each with a 95 % bootstrap CI (percentile; resampling patients, not images,
since images of one patient are correlated); Brier score and expected calibration error of the
calibrated probability; ROC, PR and reliability plots (PNG); subgroups (bacterial vs viral
pneumonia from file names, source image size); a JSON report and a per-image CSV.
"""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from services.core.calibration import (
    ECE_BINS,
    brier,
    expected_calibration_error,
    reliability_bins,
    temperature,
    threshold_metrics,
)
from services.inference.preprocess import load_image_file, preprocess_array
from services.inference.repository import latest_version_dir as latest_version_dir  # the one rule
from services.inference.tools.training.dataset import ImageRecord

CI_LEVEL = 0.95


# ---------------------------------------------------------------------------------------------- model
def load_metadata(version_dir: Path) -> dict:
    return json.loads((Path(version_dir) / "metadata.json").read_text())


def calibrate(logits: np.ndarray, metadata: dict) -> np.ndarray:
    """Calibrated probability from the raw logit as metadata.json says (temperature or isotonic)."""
    cal = metadata["calibration"]
    x = np.asarray(logits, dtype=np.float64)
    if cal["method"] == "temperature":
        return temperature(x, float(cal["temperature"]))
    if cal["method"] == "isotonic":
        return np.interp(x, cal["x_thresholds"], cal["y_thresholds"])
    raise ValueError(f"unknown calibration method {cal['method']!r}")


def read_display_image(path: Path) -> np.ndarray:
    if path.suffix.lower() == ".dcm":
        from services.core.imaging import display_array, read_dicom

        return display_array(read_dicom(path))
    return load_image_file(path)


def stretch(gray: np.ndarray, aspect: float) -> np.ndarray:
    """Resample a display image to width/height = aspect (simulates the true aspect of a squashed copy)."""
    from PIL import Image

    h = gray.shape[0]
    new_w = max(2, round(h * aspect))
    img = Image.fromarray(np.asarray(gray, dtype=np.float32), mode="F")
    return np.asarray(img.resize((new_w, h), Image.Resampling.BILINEAR), dtype=np.float32)


def predict(
    version_dir: Path,
    paths: list[Path],
    batch_size: int = 32,
    progress: Progress | None = None,
    aspect: float | None = None,
) -> tuple[np.ndarray, np.ndarray, list[tuple[int, int]]]:
    """(logits, calibrated probabilities, source image sizes (h, w)) for each path. ``aspect``
    (width/height) resamples every image to that aspect first: the letter-boxed, true-aspect input
    that real DICOM gives, for a model trained on squashed copies."""
    metadata = load_metadata(version_dir)
    size = int(metadata["input_size"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(Path(version_dir) / "model.onnx"), options, providers=["CPUExecutionProvider"])
    logits: list[np.ndarray] = []
    sizes: list[tuple[int, int]] = []
    task = progress.add_task("predict", total=len(paths), info="") if progress else None
    for start in range(0, len(paths), batch_size):
        batch = []
        for path in paths[start : start + batch_size]:
            gray = read_display_image(path)
            if aspect:
                gray = stretch(gray, aspect)
            sizes.append((int(gray.shape[0]), int(gray.shape[1])))
            batch.append(preprocess_array(gray, size))
        logits.append(session.run(["logit"], {"image": np.stack(batch).astype(np.float32)})[0])
        if progress is not None and task is not None:
            progress.advance(task, len(batch))
    out = np.concatenate(logits).astype(np.float64) if logits else np.zeros(0)
    return out, calibrate(out, metadata), sizes


# -------------------------------------------------------------------------------------------- metrics
def point_metrics(labels: np.ndarray, probs: np.ndarray, thresholds: dict[str, float]) -> dict:
    two_classes = len(np.unique(labels)) == 2
    out: dict = {
        "auc": float(roc_auc_score(labels, probs)) if two_classes else float("nan"),
        "average_precision": float(average_precision_score(labels, probs)) if two_classes else float("nan"),
        "brier": brier(labels, probs),
        "ece": expected_calibration_error(labels, probs),
    }
    for name, t in thresholds.items():
        out[name] = threshold_metrics(labels, probs, t)
    return out


def _flatten(d: dict, prefix: str = "") -> dict[str, float]:
    flat: dict[str, float] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            flat.update(_flatten(v, f"{prefix}{k}."))
        else:
            flat[f"{prefix}{k}"] = float(v)
    return flat


def bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    groups: list[str],
    thresholds: dict[str, float],
    n: int = 1000,
    seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile 95 % CI of every point metric, resampling groups (patients) with replacement."""
    by_group: dict[str, list[int]] = defaultdict(list)
    for i, g in enumerate(groups):
        by_group[g].append(i)
    members = [np.array(v) for v in by_group.values()]
    rng = np.random.default_rng(seed)
    samples: dict[str, list[float]] = defaultdict(list)
    for _ in range(n):
        pick = rng.integers(0, len(members), len(members))
        idx = np.concatenate([members[j] for j in pick])
        for k, v in _flatten(point_metrics(labels[idx], probs[idx], thresholds)).items():
            samples[k].append(v)
    lo_q, hi_q = (1 - CI_LEVEL) / 2 * 100, (1 + CI_LEVEL) / 2 * 100
    return {
        k: (float(np.nanpercentile(v, lo_q)), float(np.nanpercentile(v, hi_q)))
        for k, v in samples.items()
        if np.isfinite(v).any()
    }


def with_ci(point: dict, ci: dict[str, tuple[float, float]], prefix: str = "") -> dict:
    out: dict = {}
    for k, v in point.items():
        if isinstance(v, dict):
            out[k] = with_ci(v, ci, f"{prefix}{k}.")
        else:
            lo_hi = ci.get(f"{prefix}{k}")
            out[k] = {"value": float(v), "ci95": list(lo_hi) if lo_hi else None}
    return out


# -------------------------------------------------------------------------------------------- plots
def save_plots(labels: np.ndarray, probs: np.ndarray, thresholds: dict[str, float], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    if len(np.unique(labels)) == 2:
        fpr, tpr, _ = roc_curve(labels, probs)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(fpr, tpr, label=f"model (AUC {roc_auc_score(labels, probs):.3f})")
        ax.plot([0, 1], [0, 1], "k--", lw=0.8)
        for name, t in thresholds.items():
            m = threshold_metrics(labels, probs, t)
            ax.plot(1 - m["specificity"], m["sensitivity"], "o", label=f"{name} (p>={t:.2f})")
        ax.set(xlabel="1 - specificity", ylabel="sensitivity", title="ROC")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "roc.png", dpi=100)
        plt.close(fig)
        prec, rec, _ = precision_recall_curve(labels, probs)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(rec, prec, label=f"model (AP {average_precision_score(labels, probs):.3f})")
        ax.axhline(float(np.mean(labels)), color="k", ls="--", lw=0.8, label="prevalence")
        ax.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall")
        ax.legend(loc="lower left", fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "pr.png", dpi=100)
        plt.close(fig)
        written += ["roc.png", "pr.png"]
    edges = np.linspace(0, 1, ECE_BINS + 1)
    centers, observed, _ = zip(*reliability_bins(labels, probs, ECE_BINS), strict=True)
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(5, 6), gridspec_kw={"height_ratios": [3, 1]}, sharex=True)
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    ax.plot(centers, observed, "o-", label=f"model (ECE {expected_calibration_error(labels, probs):.3f})")
    ax.set(ylabel="observed pneumonia fraction", title="Reliability (calibrated probability)")
    ax.legend(loc="upper left", fontsize=8)
    ax2.hist(probs, bins=edges, color="grey")
    ax2.set(xlabel="predicted probability", ylabel="images")
    fig.tight_layout()
    fig.savefig(out / "reliability.png", dpi=100)
    plt.close(fig)
    written.append("reliability.png")
    return written


# -------------------------------------------------------------------------------------------- driver
def select_records(data: Path, split: str, split_file: Path | None) -> list[ImageRecord]:
    """The images of `data` (a NORMAL/ + PNEUMONIA/ folder, JPEG/PNG or DICOM, or a labeling export)
    in one split of the split file ("all": every one)."""
    from services.inference.tools.training.sources import load_training_data

    records = load_training_data(Path(data)).records
    if split == "all":
        return records
    from services.inference.tools.training.split import SPLIT_FILE, assign, load_split

    return assign(records, load_split(split_file or SPLIT_FILE))[split]


def subgroup_metrics(
    records: list[ImageRecord], labels: np.ndarray, probs: np.ndarray, sizes: list[tuple[int, int]], threshold: float
) -> dict:
    """Sensitivity per pneumonia subtype (and AUC of each subtype against all normals), and all
    metrics per source image size."""
    out: dict = {"by_subtype": {}, "by_image_size": {}}
    normal = labels == 0
    for subtype in sorted({r.subtype for r in records if r.label == 1}):
        mask = np.array([r.subtype == subtype for r in records])
        entry = {
            "n": int(mask.sum()),
            "sensitivity": threshold_metrics(labels[mask], probs[mask], threshold)["sensitivity"],
        }
        both = mask | normal
        if normal.any():
            entry["auc_vs_normal"] = float(roc_auc_score(labels[both], probs[both]))
        out["by_subtype"][subtype] = entry
    size_keys = [f"{h}x{w}" for h, w in sizes]
    for key in sorted(set(size_keys)):
        mask = np.array([k == key for k in size_keys])
        m = {"n": int(mask.sum()), "n_pneumonia": int(labels[mask].sum())}
        m.update(threshold_metrics(labels[mask], probs[mask], threshold))
        if len(np.unique(labels[mask])) == 2:
            m["auc"] = float(roc_auc_score(labels[mask], probs[mask]))
        out["by_image_size"][key] = m
    return out


def evaluate_folder(
    data: Path,
    version_dir: Path,
    split: str = "all",
    split_file: Path | None = None,
    bootstrap: int = 1000,
    out: Path | None = None,
    console: Console | None = None,
    aspect: float | None = None,
) -> dict:
    """Predict every selected image, compute metrics with CIs; write report.json, predictions.csv and
    the PNGs into ``out`` when given. Returns the report dict."""
    version_dir = Path(version_dir)
    metadata = load_metadata(version_dir)
    thresholds = {k: float(v) for k, v in metadata["thresholds"].items()}
    records = select_records(data, split, split_file)
    if not records:
        raise ValueError(f"no images selected from {data} (split {split})")
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    ) as progress:
        logits, probs, sizes = predict(version_dir, [r.path for r in records], progress=progress, aspect=aspect)
        labels = np.array([r.label for r in records])
        point = point_metrics(labels, probs, thresholds)
        task = progress.add_task("bootstrap", total=None)
        ci = bootstrap_ci(labels, probs, [r.patient for r in records], thresholds, n=bootstrap) if bootstrap else {}
        progress.update(task, total=1, completed=1)
    operating = thresholds.get("operating", 0.5)
    report = {
        "model": {"name": metadata["name"], "version": metadata["version"], "dir": str(version_dir)},
        "data": str(data),
        "split": split,
        "simulated_aspect": aspect,
        "n_images": len(records),
        "n_pneumonia": int(labels.sum()),
        "n_patients": len({r.patient for r in records}),
        "thresholds": thresholds,
        "bootstrap": {"resamples": bootstrap, "unit": "patient", "level": CI_LEVEL},
        "metrics": with_ci(point, ci),
        "subgroups": subgroup_metrics(records, labels, probs, sizes, operating),
    }
    op = report["metrics"].get("operating", {})
    report["summary"] = {
        "n_images": len(records),
        "auc": report["metrics"]["auc"],
        "brier": report["metrics"]["brier"],
        "ece": report["metrics"]["ece"],
        **{k: op[k] for k in ("accuracy", "sensitivity", "specificity", "ppv", "npv", "f1") if k in op},
        "threshold": operating,
    }
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        report["plots"] = save_plots(labels, probs, thresholds, out)
        with (out / "predictions.csv").open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "label", "patient", "subtype", "logit", "probability"])
            for rec, lg, p in zip(records, logits, probs, strict=True):
                writer.writerow([rec.name, rec.label, rec.patient, rec.subtype, f"{lg:.6f}", f"{p:.6f}"])
        (out / "report.json").write_text(json.dumps(json_safe(report), indent=1) + "\n")
    return report


def json_safe(obj):
    """NaN/inf -> None, so report.json is strict JSON."""
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def print_summary(report: dict, console: Console) -> None:
    table = Table(
        title=f"{report['model']['name']} v{report['model']['version']} on {report['split']} "
        f"({report['n_images']} images, {report['n_patients']} patients)"
    )
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% CI", justify="right")
    for k, v in report["summary"].items():
        if isinstance(v, dict):
            ci = f"{v['ci95'][0]:.4f} - {v['ci95'][1]:.4f}" if v["ci95"] else ""
            table.add_row(k, f"{v['value']:.4f}", ci)
        elif k == "threshold":
            table.add_row("operating threshold", f"{v:.4f}", "")
    console.print(table)
