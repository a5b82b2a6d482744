"""Per-image difficulty for the simulated crowd, computed once and committed (bench/data/).

A *deliberately weak* classifier (logistic regression on 16 x 16 contrast-normalised thumbnails)
is trained on images of the model's `train` split only; its margin on the images of the `val` and
`test` splits (other patients) says how much an image *looks like* its labelled class to a shallow
reader: a negative margin means it looks like the other class (a hard image, on which many people
err the same way). The committed model's calibrated probability is stored beside it (those
patients were never trained on), for the model-assisted aggregation in bench/labeling.py.

    python bench/labeling_difficulty.py                      # writes bench/data/labeling-difficulty.csv
    python bench/labeling_difficulty.py --train-n 2000 --out /tmp/d.csv

About 2 minutes on 2 cores (thumbnails of ~3,500 JPEGs, the ONNX model on ~1,500).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from services.inference.tools.evaluation import latest_version_dir, predict  # noqa: E402
from services.inference.tools.training.dataset import scan_folder  # noqa: E402
from services.inference.tools.training.split import SPLIT_FILE, assign, load_split  # noqa: E402

DEFAULT_OUT = ROOT / "bench" / "data" / "labeling-difficulty.csv"
DEFAULT_MODEL = ROOT / "deploy" / "triton" / "model_repository" / "pneumonia"
THUMB = 16


def thumbnail(path: Path) -> np.ndarray:
    img = Image.open(path).convert("L").resize((THUMB, THUMB), Image.Resampling.BILINEAR)
    v = np.asarray(img, dtype=np.float32).ravel()
    return (v - v.mean()) / (v.std() + 1e-6)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "kermany224" / "train")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--train-n", type=int, default=1500, help="train-split images for the weak classifier")
    ap.add_argument("--C", type=float, default=0.01, help="L2 strength of the weak classifier (small = weaker)")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    args = ap.parse_args()

    from sklearn.linear_model import LogisticRegression

    t0 = time.monotonic()
    splits = assign(scan_folder(args.data), load_split(SPLIT_FILE))
    rng = np.random.default_rng(args.seed)
    train = [splits["train"][i] for i in rng.permutation(len(splits["train"]))[: args.train_n]]
    held = splits["val"] + splits["test"]
    x_train = np.stack([thumbnail(r.path) for r in train])
    y_train = np.array([r.label for r in train])
    weak = LogisticRegression(C=args.C, max_iter=2000).fit(x_train, y_train)
    x_held = np.stack([thumbnail(r.path) for r in held])
    y_held = np.array([r.label for r in held])
    logit = weak.decision_function(x_held)
    margin = np.where(y_held == 1, logit, -logit)  # > 0: looks like its labelled class
    weak_acc = float(np.mean(margin > 0))
    _logits, p_model, _sizes = predict(latest_version_dir(args.model), [r.path for r in held])
    model_acc = float(np.mean((p_model >= 0.5) == (y_held == 1)))
    split_of = {id(r): name for name in ("val", "test") for r in splits[name]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "label", "patient", "split", "weak_margin", "p_model"])
        for r, m, p in zip(held, margin, p_model, strict=True):
            label = "pneumonia" if r.label == 1 else "healthy"
            w.writerow([r.path.name, label, r.patient, split_of[id(r)], f"{m:.4f}", f"{p:.5f}"])
    print(
        f"{len(held)} images -> {args.out}; weak classifier accuracy {weak_acc:.3f} "
        f"(trained on {len(train)} train-split images), model accuracy {model_acc:.3f}; "
        f"{time.monotonic() - t0:.0f} s"
    )


if __name__ == "__main__":
    main()
