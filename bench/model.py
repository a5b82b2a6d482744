"""Model benchmark: every committed version in one run — the model alone (raw onnxruntime), the whole
inference service path on real DICOM, the ONNX size, and the training wall time each version recorded.

For each version under the model repository (v1 is the peer: it stays committed for this), on the
same real training images, in rounds that alternate the versions (a change of machine load hits all
of them alike; each figure is the median of ``--repeats`` rounds):

- raw onnxruntime on ``--threads`` threads: images/s and ms/image at batch 1 and batch 32, on the
  images preprocessed once;
- the service path (issue 30's floor: >= 20 images/s on 2 cores, decode + gate + model + heatmap):
  the same images wrapped once per run as DICOM by the project's make-dicom (``--dicom-size``
  pixels, ``--dicom-bits`` bits, explicit VR little endian), each sent through the inference
  service's own ``Pipeline`` (services/inference/worker.py, via bench/service_pipeline.py, shared
  with bench/inference.py): read + sha256 + DICOM decode + preprocessing + the input gate, the
  micro-batcher (the service's default batch, wait and prefetch), the embedded onnxruntime on
  ``--threads`` threads (no spinning, the service's default), calibration and the heatmap PNG.
  Images/s, CPU ms/image (this process, all its threads) and p50/p99 latency, and whether the
  version meets the floor;
- the ONNX size: model.onnx, and every model file of the version (all but its JSON files: model.onnx
  and any external data), against issue 30's limit of 50 MB (MB = 10^6 bytes) in total;
- the training wall time / epochs / threads / load average stored in its metadata.json.

Throughputs are also printed as a ratio of v1's measured in the same run: on a machine shared with
other jobs the absolute figure is noise, the ratio much less so (the floor is an absolute figure:
run it on a quiet machine).

    python bench/model.py                       # all versions, 2 threads, 256 images, 5 rounds
    python bench/model.py --json var/bench/model.json
    python bench/model.py --images 16 --repeats 1   # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import onnxruntime as ort  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.service_pipeline import bench_pipeline, events_for, median_run  # noqa: E402
from services.inference.config import InferenceSettings  # noqa: E402
from services.inference.preprocess import preprocess_image_file  # noqa: E402
from services.inference.repository import MODEL_FILE, list_versions  # noqa: E402
from services.inference.runtime import ModelRepository, OnnxRuntime  # noqa: E402
from services.inference.tools.evaluation import load_metadata  # noqa: E402
from services.inference.tools.training.dataset import scan_folder  # noqa: E402
from services.ingest.tools.make_dicom import DicomOptions, make_dicom_file  # noqa: E402

console = Console(width=130)
DEFAULT_MODEL_DIR = ROOT / "deploy" / "triton" / "model_repository" / "pneumonia"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "kermany224" / "train"
SERVICE_FLOOR_IMAGES_PER_S = 20.0  # issue 30: the inference service end to end on 2 cores
SERVICE_PATH = "DICOM read + sha256 + decode + preprocess + input gate, micro-batch, onnxruntime, calibration, heatmap"
ONNX_LIMIT_MB = 50.0  # issue 30: the ONNX files of a version in total
# the service's own settings (services/inference/config.py defaults, not this machine's environment)
SERVICE = {
    name: InferenceSettings.model_fields[name].default
    for name in ("max_batch", "max_wait_ms", "decode_workers", "decode_processes", "prefetch", "ort_spin", "gate_file")
}


def one_pass(session: ort.InferenceSession, tensors: np.ndarray, batch: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(tensors), batch):
        session.run(["logit", "cam"], {"image": tensors[start : start + batch]})
    return time.perf_counter() - t0


def summary(walls: list[float], n: int) -> dict[str, float]:
    wall = float(np.median(walls))
    return {"images_per_s": n / wall, "ms_per_image": 1000 * wall / n}


def model_files(vdir: Path) -> list[Path]:
    """A version's model files: everything in its directory but its JSON (metadata, drift reference)."""
    return sorted(p for p in vdir.iterdir() if p.is_file() and p.suffix != ".json")


def make_dicom(paths: list[Path], out: Path, size: int, bits: int) -> list[Path]:
    """The images as DX DICOM, by make-dicom (services/ingest/tools/make_dicom.py), one folder per class."""
    opts = DicomOptions(transfer_syntax="explicit", bits=bits, size=size or None, uid_salt="bench-model")
    return [make_dicom_file(p, out / p.parent.name, opts) for p in paths]


async def measure(args: argparse.Namespace, versions: list[int], paths: list[Path], work: Path) -> dict:
    results: dict = {
        "threads": args.threads,
        "images": len(paths),
        "repeats": args.repeats,
        "loadavg_start": os.getloadavg(),
        "service_path": {
            "what": SERVICE_PATH,
            "dicom": {"size": args.dicom_size or "native", "bits": args.dicom_bits, "transfer_syntax": "explicit"},
            "settings": {**{k: str(v) if isinstance(v, Path) else v for k, v in SERVICE.items()}, "heatmaps": True},
            "ort_threads": args.threads,
            "floor_images_per_s": SERVICE_FLOOR_IMAGES_PER_S,
        },
        "onnx_limit_mb": ONNX_LIMIT_MB,
        "versions": {},
    }
    t0 = time.perf_counter()
    dicoms = make_dicom(paths, work / "dicom", args.dicom_size, args.dicom_bits)
    events = events_for(dicoms, len(dicoms))
    dicom = results["service_path"]["dicom"]
    dicom["make_seconds"] = round(time.perf_counter() - t0, 2)
    dicom["mean_file_kb"] = round(sum(p.stat().st_size for p in dicoms) / len(dicoms) / 1e3, 1)

    repository = ModelRepository(args.model_dir.parent, args.model_dir.name)
    tensors_by_size: dict[int, np.ndarray] = {}
    sessions: dict[int, tuple[ort.InferenceSession, np.ndarray]] = {}
    runtimes: dict[int, OnnxRuntime] = {}
    try:
        for v in versions:
            vdir = args.model_dir / str(v)
            meta = load_metadata(vdir)
            size = int(meta["input_size"])
            if size not in tensors_by_size:
                tensors_by_size[size] = np.stack([preprocess_image_file(p, size) for p in paths]).astype(np.float32)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.inter_op_num_threads = 1
            session = ort.InferenceSession(str(vdir / MODEL_FILE), options, providers=["CPUExecutionProvider"])
            one_pass(session, tensors_by_size[size][:64], 32)  # warm-up
            sessions[v] = (session, tensors_by_size[size])
            # the service's embedded runtime, pinned to this version
            runtimes[v] = OnnxRuntime(repository, version=str(v), threads=args.threads, spin=SERVICE["ort_spin"])
            await runtimes[v].start()
            files = model_files(vdir)
            total_mb = sum(p.stat().st_size for p in files) / 1e6
            training = meta.get("training", {})
            results["versions"][str(v)] = {
                "onnx_mb": (vdir / MODEL_FILE).stat().st_size / 1e6,
                "onnx_total_mb": total_mb,
                "onnx_files": [p.name for p in files],
                "onnx_within_limit": total_mb <= ONNX_LIMIT_MB,
                "input_size": size,
                "train_seconds": meta.get("train_seconds"),
                "train_epochs": len(training.get("history", [])),
                "train_threads": training.get("threads"),
                "train_loadavg": training.get("loadavg"),
            }
        # rounds alternate the versions, so a change of machine load hits all of them alike
        n1 = min(64, len(paths))
        walls: dict[tuple[int, int], list[float]] = {(v, b): [] for v in versions for b in (1, 32)}
        service_runs: dict[int, list[dict[str, float]]] = {v: [] for v in versions}
        for r in range(args.repeats):
            for v, (session, tensors) in sessions.items():
                walls[(v, 1)].append(one_pass(session, tensors[:n1], 1))
                walls[(v, 32)].append(one_pass(session, tensors, 32))
                service_runs[v].append(
                    await bench_pipeline(
                        runtimes[v],
                        events,
                        SERVICE["max_batch"],
                        work / f"heatmaps-v{v}",
                        SERVICE["decode_workers"],
                        SERVICE["max_wait_ms"],
                        SERVICE["decode_processes"],
                        gate_file=SERVICE["gate_file"],
                        in_flight=SERVICE["prefetch"],
                    )
                )
            console.print(f"round {r + 1}/{args.repeats} done", style="dim")
    finally:
        for runtime in runtimes.values():
            await runtime.close()
    for v, (_, tensors) in sessions.items():
        row = results["versions"][str(v)]
        row["batch1"] = summary(walls[(v, 1)], n1)
        row["batch32"] = summary(walls[(v, 32)], len(tensors))
        row["service"] = median_run(service_runs[v])
        row["service_meets_floor"] = row["service"]["images_per_s"] >= SERVICE_FLOOR_IMAGES_PER_S
    results["loadavg_end"] = os.getloadavg()
    base = results["versions"][str(versions[0])]
    for row in results["versions"].values():
        row["batch32_ratio_vs_first"] = row["batch32"]["images_per_s"] / base["batch32"]["images_per_s"]
        row["service_ratio_vs_first"] = row["service"]["images_per_s"] / base["service"]["images_per_s"]
    return results


def show(results: dict, first: str) -> None:
    n = results["images"]
    table = Table(title=f"model alone: onnxruntime {results['threads']} threads, {n} images (preprocessed once)")
    for col in ("version", "ONNX MB", "b1 img/s", "b32 img/s", f"b32 vs v{first}", "train s", "epochs"):
        table.add_column(col)
    for v, r in results["versions"].items():
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
    sp = results["service_path"]
    dicom = sp["dicom"]
    side = f"{dicom['size']} x {dicom['size']}" if dicom["size"] != "native" else "native-size"
    settings = sp["settings"]
    table = Table(
        title=f"service path: {n} DICOM {side} px {dicom['bits']} bit -> decode, gate, preprocess; batch <= "
        f"{settings['max_batch']} (prefetch {settings['prefetch']}); onnxruntime {sp['ort_threads']} threads; heatmap"
    )
    for col in ("version", "img/s", f"vs v{first}", "CPU ms/img", "p50 ms", "p99 ms", "ONNX total MB"):
        table.add_column(col, justify="right")
    for v, r in results["versions"].items():
        s = r["service"]
        table.add_row(
            v,
            f"{s['images_per_s']:.1f}",
            f"{r['service_ratio_vs_first']:.2f}",
            f"{s['cpu_ms_per_image']:.1f}",
            f"{s['p50_ms']:.0f}",
            f"{s['p99_ms']:.0f}",
            f"{r['onnx_total_mb']:.1f}",
        )
    console.print(table)
    floor, limit = sp["floor_images_per_s"], results["onnx_limit_mb"]
    for v, r in results["versions"].items():
        s = r["service"]
        rounds = ", ".join(f"{x:.1f}" for x in s["all_images_per_s"])
        console.print(
            f"v{v}: service path {s['images_per_s']:.1f} images/s (rounds: {rounds}) on {sp['ort_threads']} "
            f"onnxruntime threads: {'meets' if r['service_meets_floor'] else 'MISSES'} the floor of >= {floor:g} "
            f"images/s; ONNX {r['onnx_total_mb']:.1f} MB in total ({', '.join(r['onnx_files'])}): "
            f"{'within' if r['onnx_within_limit'] else 'OVER'} the {limit:g} MB limit"
        )
    console.print(f"{os.cpu_count()} CPUs; load average start {results['loadavg_start']}, end {results['loadavg_end']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2, help="onnxruntime intra-op threads (raw and service)")
    ap.add_argument("--repeats", type=int, default=5, help="rounds; the median of each figure is kept")
    ap.add_argument("--dicom-size", type=int, default=512, help="DICOM side in pixels (0: the JPEGs' own 224)")
    ap.add_argument("--dicom-bits", type=int, default=12, choices=[8, 12, 16])
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    versions = list_versions(args.model_dir)
    if not versions:
        raise SystemExit(f"no model version under {args.model_dir}")
    records = scan_folder(args.data)
    paths = [r.path for r in records[:: max(1, len(records) // args.images)]][: args.images]
    with tempfile.TemporaryDirectory(prefix="pt-bench-model-") as work:
        results = asyncio.run(measure(args, versions, paths, Path(work)))
    show(results, str(versions[0]))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
