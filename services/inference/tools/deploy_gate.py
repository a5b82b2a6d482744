"""The quality gate of `pneumotriage model deploy`: a candidate version against the active one on one
fixed reference set.

Reference set: by default the internal test split of the shared training data (patients held out by
the committed split, services/inference/tools/training/split.py; 721 images, never trained or
validated on). Both versions run on the same preprocessed tensors (the serving preprocessing) with
onnxruntime, and each is read with its own calibration and operating threshold (metadata.json), so
the comparison is what each would do on a worklist.

Refused when the candidate is below the active version by more than the margins:
- AUC (threshold-free ranking) lower by more than ``max_auc_drop`` (default 0.01), or
- sensitivity at its own operating threshold lower by more than ``max_sensitivity_drop`` (0.02).
The margins are a little above the sampling noise of the default reference set (the standard error
of a 0.97 sensitivity on its 514 pneumonia images is ~0.0075; of an AUC near 0.99, ~0.003), so a
refusal is a real loss, not a re-draw. A first version (nothing active) is measured, not compared.

The candidate's logits on the reference set also become its drift reference
(services/core/drift.py), written into the version by the deploy.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from services.inference.deploy import DeployError

DEFAULT_MAX_AUC_DROP = 0.01
DEFAULT_MAX_SENSITIVITY_DROP = 0.02


@dataclass(frozen=True)
class Margins:
    max_auc_drop: float = DEFAULT_MAX_AUC_DROP
    max_sensitivity_drop: float = DEFAULT_MAX_SENSITIVITY_DROP


@dataclass(frozen=True)
class ReferenceSet:
    """Labeled images laid out as NORMAL/ and PNEUMONIA/; ``split`` selects the committed split's
    part (test, val, train) or ``all``; ``limit`` keeps an evenly spaced subset (both classes)."""

    data: Path
    split: str = "test"
    split_file: Path | None = None
    limit: int = 0

    def records(self) -> list:
        from services.inference.tools.evaluation import select_records

        if self.split not in ("all", "test", "val", "train"):
            raise DeployError(f"reference split must be all, test, val or train, not {self.split!r}")
        try:
            records = select_records(Path(self.data), self.split, self.split_file)
        except (FileNotFoundError, NotADirectoryError, ValueError, KeyError) as exc:
            raise DeployError(f"reference set {self.data} ({self.split}): {exc}") from exc
        if self.limit and len(records) > self.limit:
            step = len(records) / self.limit
            records = [records[int(i * step)] for i in range(self.limit)]
        if len({r.label for r in records}) < 2:
            raise DeployError(f"reference set {self.data} ({self.split}) needs images of both classes")
        return records


def version_figures(logits: np.ndarray, labels: np.ndarray, metadata: dict[str, Any]) -> dict[str, float]:
    """AUC, and sensitivity/specificity at the version's own operating threshold (its calibration)."""
    from sklearn.metrics import roc_auc_score

    from services.core.calibration import threshold_metrics
    from services.inference.runtime import Calibration

    probs = Calibration.from_metadata(metadata.get("calibration")).apply(logits)
    threshold = float((metadata.get("thresholds") or {}).get("operating", 0.5))
    at = threshold_metrics(labels, probs, threshold)
    return {
        "auc": float(roc_auc_score(labels, logits)),
        "sensitivity": float(at["sensitivity"]),
        "specificity": float(at["specificity"]),
        "threshold": threshold,
    }


class ReferenceGate:
    """services.inference.deploy.QualityGate on a ReferenceSet."""

    def __init__(self, reference: ReferenceSet, margins: Margins = Margins(), console: Console | None = None) -> None:
        self.reference = reference
        self.margins = margins
        self.console = console

    def judge(self, candidate: Path, active: Path | None) -> dict[str, Any]:
        import onnxruntime as ort

        from services.core.drift import build_reference
        from services.inference.preprocess import preprocess_array
        from services.inference.tools.evaluation import load_metadata, read_display_image

        records = self.reference.records()
        labels = np.array([r.label for r in records])
        dirs = {"candidate": Path(candidate)} | ({"active": Path(active)} if active is not None else {})
        metas = {k: load_metadata(d) for k, d in dirs.items()}
        sizes = {int(m["input_size"]) for m in metas.values()}
        tensors: dict[int, list[np.ndarray]] = {s: [] for s in sizes}
        with Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=self.console,
            transient=True,
        ) as progress:
            task = progress.add_task("reference set", total=len(records))
            for rec in records:
                try:
                    gray = read_display_image(rec.path)
                except Exception as exc:
                    raise DeployError(f"reference image {rec.path} does not decode: {exc}") from exc
                for s in sizes:
                    tensors[s].append(preprocess_array(gray, s))
                progress.advance(task)
            logits: dict[str, np.ndarray] = {}
            for key, d in dirs.items():
                size = int(metas[key]["input_size"])
                options = ort.SessionOptions()
                options.intra_op_num_threads = 2
                session = ort.InferenceSession(str(d / "model.onnx"), options, providers=["CPUExecutionProvider"])
                batch = np.stack(tensors[size]).astype(np.float32)
                run = progress.add_task(f"{key} model", total=len(batch))
                out = []
                for i in range(0, len(batch), 64):
                    out.append(np.asarray(session.run(["logit"], {"image": batch[i : i + 64]})[0]).reshape(-1))
                    progress.advance(run, len(out[-1]))
                logits[key] = np.concatenate(out).astype(np.float64)
        figures = {k: version_figures(logits[k], labels, metas[k]) for k in dirs}
        reasons: list[str] = []
        if active is not None:
            c, a = figures["candidate"], figures["active"]
            if c["auc"] < a["auc"] - self.margins.max_auc_drop:
                reasons.append(
                    f"AUC {c['auc']:.4f} is below the active version's {a['auc']:.4f} "
                    f"by more than {self.margins.max_auc_drop}"
                )
            if c["sensitivity"] < a["sensitivity"] - self.margins.max_sensitivity_drop:
                reasons.append(
                    f"sensitivity {c['sensitivity']:.4f} at its operating threshold {c['threshold']:.3f} is below "
                    f"the active version's {a['sensitivity']:.4f} by more than {self.margins.max_sensitivity_drop}"
                )
        digest = hashlib.sha256("".join(sorted(r.sha256 for r in records)).encode()).hexdigest()
        report: dict[str, Any] = {
            "passed": not reasons,
            "reasons": reasons,
            "reference": {
                "data": str(self.reference.data),
                "split": self.reference.split,
                "n_images": len(records),
                "n_pneumonia": int(labels.sum()),
                "sha256": digest,
            },
            "margins": asdict(self.margins),
            "candidate": figures["candidate"],
            "active": {**figures["active"], "version": str(metas["active"].get("version", Path(active).name))}
            if active is not None
            else None,
        }
        if len(records) >= 50:
            probs = _probabilities(logits["candidate"], metas["candidate"])
            source = f"{self.reference.split} split of {Path(self.reference.data).name}, {len(records)} images"
            report["drift_reference"] = build_reference(logits["candidate"], probs, "", "", source)
        return report


def _probabilities(logits: np.ndarray, metadata: dict[str, Any]) -> np.ndarray:
    from services.inference.runtime import Calibration

    return Calibration.from_metadata(metadata.get("calibration")).apply(logits)
