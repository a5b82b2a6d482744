"""A simulated site whose images differ from the training data: does the drift monitor notice, and
does `triage recalibrate` with N confirmed labels restore the rule-out?

    python bench/site_shift.py [--transform gamma] [--labels 200] [--model-dir .../pneumonia/<v>]

1. The committed model (onnxruntime, the service's preprocessing) scores the val + test chests of
   the shared data twice: as they are, and through a "site" transform (default: a detector with
   another response curve, gamma 0.5 + unsharp-mask edge enhancement + true 4:5 aspect).
2. Drift: windows of 300 predictions from the unshifted test split and from the shifted stream,
   each compared with the version's drift_reference.json (val split) by the aggregator's monitor
   code; the share of windows that fire is reported for both.
3. Recalibration: the shifted stream is split by patient; N labeled images fit the site
   calibration (the aggregator's `triage recalibrate` code, committed policy.yaml); the rest
   (held out) are triaged model-only with (a) the model's own probabilities and the policy
   thresholds, (b) the site calibration. Reported: rule-out sensitivity / specificity, ECE.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from services.aggregator.drift import DriftConfig, evaluate_window  # noqa: E402
from services.aggregator.policy import Policy  # noqa: E402
from services.aggregator.tools.recalibrate import SiteLabel, fit_site_calibration, rule_out_metrics  # noqa: E402
from services.core.calibration import expected_calibration_error, platt  # noqa: E402
from services.core.drift import REFERENCE_FILE, DriftReference  # noqa: E402
from services.inference.preprocess import load_image_file, preprocess_array  # noqa: E402
from services.inference.tools.evaluation import (  # noqa: E402
    calibrate,
    latest_version_dir,
    load_metadata,
    select_records,
)


def site_transform(gray: np.ndarray, kind: str) -> np.ndarray:
    out = np.asarray(gray, dtype=np.float32)
    if kind in ("gamma", "all"):
        out = np.clip(out, 0, 1) ** 0.5
    if kind in ("sharpen", "gamma", "all"):
        img = Image.fromarray((out * 255).astype(np.uint8), mode="L")
        out = np.asarray(img.filter(ImageFilter.UnsharpMask(radius=4, percent=200, threshold=0)), np.float32) / 255
    if kind in ("aspect", "gamma", "all"):
        h, w = out.shape
        img = Image.fromarray(out, mode="F").resize((w, int(h * 1.25)), Image.Resampling.BILINEAR)
        out = np.asarray(img, dtype=np.float32)
    if kind in ("noise", "all"):
        out = np.clip(out + np.random.default_rng(0).normal(0, 0.04, out.shape), 0, 1).astype(np.float32)
    return out


def score(vdir: Path, paths: list[Path], kind: str | None) -> np.ndarray:
    import onnxruntime as ort

    meta = load_metadata(vdir)
    size = int(meta["input_size"])
    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    session = ort.InferenceSession(str(vdir / "model.onnx"), options, providers=["CPUExecutionProvider"])
    logits = []
    for start in range(0, len(paths), 32):
        batch = []
        for p in paths[start : start + 32]:
            gray = load_image_file(p)
            batch.append(preprocess_array(site_transform(gray, kind) if kind else gray, size))
        logits.append(session.run(["logit"], {"image": np.stack(batch).astype(np.float32)})[0])
    return np.concatenate(logits).astype(np.float64)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model-dir", type=Path, default=REPO / "deploy/triton/model_repository/pneumonia")
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared/data/kermany224/train")
    ap.add_argument("--transform", default="gamma", choices=["gamma", "sharpen", "aspect", "noise", "all"])
    ap.add_argument("--labels", type=int, nargs="+", default=[100, 200, 400])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    vdir = args.model_dir if (args.model_dir / "model.onnx").exists() else latest_version_dir(args.model_dir)
    meta = load_metadata(vdir)
    reference = DriftReference.load(vdir / REFERENCE_FILE)
    policy = Policy.load(REPO / "services/aggregator/policy.yaml")

    val = select_records(args.data, "val", None)
    test = select_records(args.data, "test", None)
    records = val + test
    y = np.array([r.label for r in records], dtype=int)
    groups = np.array([r.patient for r in records])
    plain_test = score(vdir, [r.path for r in test], None)
    shifted = score(vdir, [r.path for r in records], args.transform)
    p_shifted = calibrate(shifted, meta)
    report: dict = {"model": f"{meta['name']} v{vdir.name}", "transform": args.transform, "images": len(records)}

    # ---- drift ----
    rng = np.random.default_rng(args.seed)
    config = DriftConfig(vdir.parent, window=300, min_n=100)

    def fire_rate(logits: np.ndarray, trials: int = 200) -> tuple[float, float]:
        fired, psis = 0, []
        for _ in range(trials):
            idx = rng.choice(len(logits), 300, replace=False)
            st = evaluate_window(reference, logits[idx], calibrate(logits[idx], meta), config)
            fired += st.alarm
            psis.append(st.psi or 0.0)
        return fired / trials, float(np.median(psis))

    report["drift"] = {
        "unshifted_test": dict(zip(("alarm_rate", "median_psi"), fire_rate(plain_test), strict=True)),
        "shifted": dict(zip(("alarm_rate", "median_psi"), fire_rate(shifted), strict=True)),
        "positive_rate": {
            "reference_val": reference.positive_rate,
            "unshifted_test": float((calibrate(plain_test, meta) >= 0.5).mean()),
            "shifted": float((p_shifted >= 0.5).mean()),
        },
    }

    # ---- recalibration ----
    patients = np.unique(groups)
    report["recalibration"] = []
    for n_labels in args.labels:
        perm = np.random.default_rng(args.seed).permutation(patients)
        fit_mask = np.zeros(len(records), dtype=bool)
        for pat in perm:
            if fit_mask.sum() >= n_labels:
                break
            fit_mask |= groups == pat
        held = ~fit_mask
        labels = [
            SiteLabel(str(i), float(shifted[i]), float(p_shifted[i]), int(y[i]), "clinician", meta["name"], vdir.name)
            for i in np.flatnonzero(fit_mask)
        ]
        cal = fit_site_calibration(labels, policy, bootstrap=100, seed=args.seed)
        p_site = platt(shifted[held], cal.a, cal.b)
        before = rule_out_metrics(p_shifted[held], y[held], policy, policy.thresholds)
        after = rule_out_metrics(p_site, y[held], policy, Policy(policy.fusion, cal.thresholds).thresholds)
        plain_p = calibrate(plain_test, meta)
        y_test = np.array([r.label for r in test], dtype=int)
        unshifted = rule_out_metrics(plain_p, y_test, policy, policy.thresholds)
        row = {
            "labels": int(fit_mask.sum()),
            "held_out": int(held.sum()),
            "platt": [round(cal.a, 3), round(cal.b, 3)],
            "rule_out_threshold": round(cal.thresholds.rule_out, 4),
            "unshifted_test_policy": unshifted,
            "shifted_before": before,
            "shifted_after": after,
            "ece_before": round(expected_calibration_error(y[held], p_shifted[held]), 4),
            "ece_after": round(expected_calibration_error(y[held], p_site), 4),
            "ci95_out_of_bag": {k: cal.meta["ci95_bootstrap"][k] for k in ("sensitivity", "specificity")},
        }
        report["recalibration"].append(row)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
