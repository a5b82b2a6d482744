"""Model benchmark: served-model images/s of every committed version in one run, and the training
wall time each version recorded.

For each version under the model repository (v1 is the peer: it stays committed for this), on the
same preprocessed tensors of real training images, with onnxruntime on ``--threads`` threads:
images/s and ms/image at batch 1 and batch 32 (median of ``--repeats``), plus the ONNX size and
the training wall time / epochs / threads / load average stored in its metadata.json. Prints each
version's throughput as a ratio of v1's measured in the same run: on a machine shared with other
jobs the absolute figure is noise, the ratio much less so.

    python bench/model.py                       # all versions, 2 threads
    python bench/model.py --json var/bench/model.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from services.inference.preprocess import preprocess_image_file  # noqa: E402
from services.inference.tools.evaluation import load_metadata  # noqa: E402
from services.inference.tools.training.dataset import scan_folder  # noqa: E402

console = Console(width=130)
DEFAULT_MODEL_DIR = ROOT / "deploy" / "triton" / "model_repository" / "pneumonia"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "kermany224" / "train"


def one_pass(session: ort.InferenceSession, tensors: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(tensors), batch):
        session.run(["logit", "cam"], {"image": tensors[start : start + batch]})
    return time.perf_counter() - t0


def summary(walls: list[float], n: int) -> dict[str, float]:
    wall = float(np.median(walls))
    return {"images_per_s": n / wall, "ms_per_image": 1000 * wall / n}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    versions = sorted(int(p.name) for p in args.model_dir.iterdir() if (p / "model.onnx").exists())
    records = scan_folder(args.data)
    paths = [r.path for r in records[:: max(1, len(records) // args.images)]][: args.images]
    results: dict = {"threads": args.threads, "images": len(paths), "loadavg_start": os.getloadavg(), "versions": {}}
    tensors_by_size: dict[int, np.ndarray] = {}
    sessions: dict[int, tuple[ort.InferenceSession, np.ndarray]] = {}
    for v in versions:
        vdir = args.model_dir / str(v)
        meta = load_metadata(vdir)
        size = int(meta["input_size"])
        if size not in tensors_by_size:
            tensors_by_size[size] = np.stack([preprocess_image_file(p, size) for p in paths]).astype(np.float32)
        options = ort.SessionOptions()
        options.intra_op_num_threads = args.threads
        options.inter_op_num_threads = 1
        session = ort.InferenceSession(str(vdir / "model.onnx"), options, providers=["CPUExecutionProvider"])
        one_pass(session, tensors_by_size[size][:64], 32)  # warm-up
        sessions[v] = (session, tensors_by_size[size])
        training = meta.get("training", {})
        results["versions"][str(v)] = {
            "onnx_mb": (vdir / "model.onnx").stat().st_size / 1e6,
            "input_size": size,
            "train_seconds": meta.get("train_seconds"),
            "train_epochs": len(training.get("history", [])),
            "train_threads": training.get("threads"),
            "train_loadavg": training.get("loadavg"),
        }
    # rounds alternate the versions, so a change of machine load hits all of them alike
    walls: dict[tuple[int, int], list[float]] = {(v, b): [] for v in versions for b in (1, 32)}
    for _ in range(args.repeats):
        for v, (session, tensors) in sessions.items():
            walls[(v, 1)].append(one_pass(session, tensors[:64], 1))
            walls[(v, 32)].append(one_pass(session, tensors, 32))
    for v, (_, tensors) in sessions.items():
        results["versions"][str(v)]["batch1"] = summary(walls[(v, 1)], 64)
        results["versions"][str(v)]["batch32"] = summary(walls[(v, 32)], len(tensors))
    results["loadavg_end"] = os.getloadavg()
    base = results["versions"].get(str(versions[0]))
    table = Table(title=f"served model, onnxruntime {args.threads} threads, {len(paths)} images")
    for col in ("version", "ONNX MB", "b1 img/s", "b32 img/s", f"b32 vs v{versions[0]}", "train s", "epochs"):
        table.add_column(col)
    for v, r in results["versions"].items():
        r["batch32_ratio_vs_first"] = r["batch32"]["images_per_s"] / base["batch32"]["images_per_s"]
        table.add_row(
            v,
            f"{r['onnx_mb']:.1f}",
            f"{r['batch1']['images_per_s']:.0f}",
            f"{r['batch32']['images_per_s']:.0f}",
            f"{r['batch32_ratio_vs_first']:.2f}",
            f"{r['train_seconds']:.0f}" if r["train_seconds"] else "-",
            str(r["train_epochs"]),
        )
    console.print(table)
    console.print(f"load average start {results['loadavg_start']}, end {results['loadavg_end']}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
