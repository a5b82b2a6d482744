"""Site adaptation benchmark (issue 28): what a site gains from its own labels.

A **simulated site**: the proxy's held-out acquisition batches of the training folder
(services/inference/tools/proxy.py `external_records`: ~720 images the shipped recipe never trains
or validates on), optionally under one of `model proxy-eval`'s display shifts (`--stress`), written
as PNG files into a temporary site folder (nothing is copied into the repository). For each number
of site labels (`--labels`) and each random draw (`--draws`), whole patients are drawn (stratified by
class) until that many images are labelled; every other image of the site is **held back** and
only scored. On the held-back images, per method:

(a) **base**: the base version as shipped, at its own operating threshold;
(b) **recalibrate**: Platt scaling of the base version's logit (as `pneumotriage triage recalibrate`
    fits it) and one operating threshold (the highest keeping sensitivity >= 0.95) on the site labels;
    the product's recalibration re-chooses the triage policy's thresholds on the fused posterior
    instead (rule-out sensitivity >= 0.95, URGENT PPV ...), so this is its model-only analogue;
    **recalibrate_bound**: the same with the threshold keeping 0.95 with `--confidence` (0.8), as
    `triage recalibrate`'s rule-out does since `--rule-out-confidence`;
(c) **adapt**: `pneumotriage model adapt`'s own code (services/inference/tools/adapt.py) on a folder
    of the site labels (it locks 30 % of their patients away for its own promotion evidence and
    fine-tunes on the rest), the candidate scored at its own operating threshold; with the wall time.

Reported: AUC, sensitivity, specificity, ECE (mean and spread over the draws) and specificity at
sensitivity 0.95 (threshold free), for each method and label count, against the issue's aim (AUC >=
0.985, specificity >= 0.90 at sensitivity >= 0.95, ECE <= 0.05, from <= 300 labels, adaptation <= 15
min on 2 cores). The simulated site is not the kept official split: its figures say how the methods
compare, not what a hospital will see.

    .venv/bin/python bench/site_adapt.py --labels 100 200 300 --draws 2 [--stress gamma_1.6] [--json-out r.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LOAD0 = " ".join(f"{x:.2f}" for x in os.getloadavg())

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

console = Console()
TRAIN = ROOT.parent / "shared" / "data" / "kermany224" / "train"
LIVE = ROOT / "deploy" / "triton" / "model_repository" / "pneumonia"
SENSITIVITY = 0.95


def build_site(work: Path, stress: str, seed: int) -> list:
    """The site's images as PNG files under work/site/{NORMAL,PNEUMONIA}, as ImageRecords."""
    from pydicom.dataset import Dataset

    from services.core.imaging import display_array
    from services.inference.tools.evaluation import read_display_image
    from services.inference.tools.proxy import STRESSES, external_records
    from services.inference.tools.training.dataset import ImageRecord

    out = []
    records = external_records(TRAIN)
    for i, r in enumerate(records):
        gray = read_display_image(r.path)
        shifted = STRESSES[stress](gray, np.random.default_rng(seed * 100_003 + i))
        if isinstance(shifted, Dataset):
            shifted = display_array(shifted)
        folder = work / "site" / ("PNEUMONIA" if r.label else "NORMAL")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / (r.path.stem + ".png")
        Image.fromarray(np.clip(np.asarray(shifted) * 255.0 + 0.5, 0, 255).astype(np.uint8)).save(path)
        out.append(ImageRecord(path, r.label, r.patient, r.sha256))
    return out


def draw_labels(records: list, n: int, seed: int) -> tuple[list, list]:
    """Whole patients, per class in the site's proportion, until n images are labelled; (labelled, held back)."""
    rng = np.random.default_rng(seed)
    share = np.mean([r.label for r in records])
    by_patient: dict[str, list] = {}
    for r in records:
        by_patient.setdefault(r.patient, []).append(r)
    labelled: list = []
    for label, want in ((1, round(n * share)), (0, n - round(n * share))):
        patients = sorted(p for p, rs in by_patient.items() if rs[0].label == label)
        got = 0
        for i in rng.permutation(len(patients)):
            if got >= want:
                break
            labelled += by_patient[patients[i]]
            got += len(by_patient[patients[i]])
    chosen = {id(r) for r in labelled}
    return labelled, [r for r in records if id(r) not in chosen]


def metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict:
    from sklearn.metrics import roc_auc_score

    from services.core.calibration import expected_calibration_error, specificity_at_sensitivity, threshold_metrics

    at = threshold_metrics(y, p, threshold)
    return {
        "auc": float(roc_auc_score(y, p)),
        "sensitivity": at["sensitivity"],
        "specificity": at["specificity"],
        "ece": expected_calibration_error(y, p),
        "spec_at_sens95": specificity_at_sensitivity(y, p, SENSITIVITY),
    }


def recalibrated(
    logit_lab: np.ndarray, y_lab: np.ndarray, logit_eval: np.ndarray, confidence: float
) -> tuple[np.ndarray, float]:
    """Platt on the base logit, fitted on the labels; the threshold keeping sensitivity >= 0.95 there,
    with `confidence` on new images (services/core/sensitivity_bound.py, as `triage recalibrate`'s
    rule-out since it has `--rule-out-confidence 0.8`; 0: the sample's own point)."""
    from services.core.calibration import fit_platt, platt, threshold_for_sensitivity

    a, b = fit_platt(logit_lab, y_lab)
    threshold = threshold_for_sensitivity(y_lab, platt(logit_lab, a, b), SENSITIVITY, confidence)
    return platt(logit_eval, a, b), threshold


def label_folder(work: Path, labelled: list) -> Path:
    folder = work / "labels"
    for r in labelled:
        target = folder / ("PNEUMONIA" if r.label else "NORMAL") / r.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(r.path)
    return folder


def run(args: argparse.Namespace) -> dict:
    from services.inference.tools.adapt import AdaptRecipe, adapt
    from services.inference.tools.evaluation import load_metadata, predict

    base_dir = LIVE / str(args.base_version)
    base_meta = load_metadata(base_dir)
    work = Path(tempfile.mkdtemp(prefix="pt-bench-site-"))
    os.environ["PT_DATA_DIR"] = str(work / "data")  # model adapt's site registry (locked sets) goes here
    t = time.monotonic()
    site = build_site(work, args.stress, args.seed)
    y_all = np.array([r.label for r in site])
    console.print(
        f"simulated site: {len(site)} images ({int(y_all.sum())} pneumonia), {len({r.patient for r in site})} patients,"
        f" stress {args.stress}, written in {time.monotonic() - t:.0f} s"
    )
    logits_all, calibrated, _ = predict(base_dir, [r.path for r in site])  # calibrated: as the service publishes
    base_cal = {id(r): p for r, p in zip(site, calibrated, strict=True)}
    base_logit = {id(r): lg for r, lg in zip(site, logits_all, strict=True)}
    base_threshold = float(base_meta["thresholds"]["operating"])
    results: list[dict] = []
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task("adaptations", total=len(args.labels) * args.draws)
        for n in args.labels:
            for draw in range(args.draws):
                seed = args.seed + 1000 * draw + n
                labelled, held = draw_labels(site, n, seed)
                y_lab = np.array([r.label for r in labelled])
                y_eval = np.array([r.label for r in held])
                row = {"labels": len(labelled), "target_labels": n, "draw": draw, "held_back": len(held)}
                row["base"] = metrics(y_eval, np.array([base_cal[id(r)] for r in held]), base_threshold)
                lab_logits = np.array([base_logit[id(r)] for r in labelled])
                held_logits = np.array([base_logit[id(r)] for r in held])
                p_eval, thr = recalibrated(lab_logits, y_lab, held_logits, 0.0)
                row["recalibrate"] = {**metrics(y_eval, p_eval, thr), "threshold": thr}
                p_eval, thr = recalibrated(lab_logits, y_lab, held_logits, args.confidence)
                row["recalibrate_bound"] = {**metrics(y_eval, p_eval, thr), "threshold": thr}
                draw_dir = work / f"n{n}-d{draw}"
                folder = label_folder(draw_dir, labelled)
                recipe = AdaptRecipe(epochs=args.epochs, seed=seed, threads=args.threads, bootstrap=args.bootstrap)
                started = time.monotonic()
                vdir = adapt([folder], base_dir, draw_dir / "staging", f"bench-n{n}-d{draw}", recipe, console=console)
                wall = time.monotonic() - started
                meta = load_metadata(vdir)
                _, p_cand, _ = predict(vdir, [r.path for r in held])
                row["adapt"] = {
                    **metrics(y_eval, np.asarray(p_cand), float(meta["thresholds"]["operating"])),
                    "threshold": float(meta["thresholds"]["operating"]),
                    "wall_s": wall,
                    "fine_tuned_on": meta["site_adaptation"]["n_fine_tune"],
                    "calibrated_on": meta["site_adaptation"]["n_calibration"],
                }
                results.append(row)
                console.print(
                    f"n={n} draw {draw}: base AUC {row['base']['auc']:.3f} spec {row['base']['specificity']:.3f} | "
                    f"recalibrate spec {row['recalibrate']['specificity']:.3f} | adapt AUC {row['adapt']['auc']:.3f} "
                    f"sens {row['adapt']['sensitivity']:.3f} spec {row['adapt']['specificity']:.3f} "
                    f"ECE {row['adapt']['ece']:.3f} in {wall:.0f} s"
                )
                progress.advance(task)
    return {
        "stress": args.stress,
        "base_version": args.base_version,
        "site_images": len(site),
        "site_pneumonia": int(y_all.sum()),
        "epochs": args.epochs,
        "rows": results,
        "load_before": LOAD0,
        "load_after": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "cpus": os.cpu_count(),
    }


def summarise(report: dict) -> None:
    table = Table(title=f"site adaptation (bench/site_adapt.py), simulated site: held-out batches, {report['stress']}")
    for col in ("labels", "method", "AUC", "sensitivity", "specificity", "ECE", "spec @ sens 0.95", "wall"):
        table.add_column(col)

    def cell(rows: list[dict], method: str, key: str) -> str:
        values = [r[method][key] for r in rows]
        return f"{statistics.mean(values):.3f}" + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")

    for n in sorted({r["target_labels"] for r in report["rows"]}):
        rows = [r for r in report["rows"] if r["target_labels"] == n]
        for method in ("base", "recalibrate", "recalibrate_bound", "adapt"):
            wall = cell(rows, "adapt", "wall_s") + " s" if method == "adapt" else ""
            table.add_row(
                str(n),
                method,
                *(cell(rows, method, k) for k in ("auc", "sensitivity", "specificity", "ece", "spec_at_sens95")),
                wall,
            )
    console.print(table)
    console.print(
        f"{len(report['rows'])} draws; site {report['site_images']} images ({report['site_pneumonia']} pneumonia);"
        f" base v{report['base_version']}; adapt {report['epochs']} epochs; load average before/after "
        f"{report['load_before']} / {report['load_after']}; CPUs {report['cpus']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=int, nargs="+", default=[100, 200, 300], help="site labels per draw")
    ap.add_argument("--draws", type=int, default=2, help="random draws per label count")
    ap.add_argument("--stress", default="clean", help="a display shift of model proxy-eval for the whole site")
    ap.add_argument("--base-version", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=4, help="model adapt --epochs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bootstrap", type=int, default=200, help="model adapt's bootstrap resamples (its own evidence)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--confidence", type=float, default=0.8, help="recalibrate_bound's confidence (0.8 in the product)")
    ap.add_argument("--json-out", type=Path, default=None)
    args = ap.parse_args()
    report = run(args)
    summarise(report)
    if args.json_out:
        args.json_out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
