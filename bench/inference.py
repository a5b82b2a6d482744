"""Inference benchmark: images/s and per-image latency, batch 1/8/32, in one run on the same images.

  (a) raw onnxruntime on already-preprocessed tensors (the ceiling: the model alone)
  (b) the service pipeline, embedded runtime: read + sha256 + DICOM decode + preprocess (decode
      threads) + micro-batching + onnxruntime + calibration (+ heatmap PNG unless --no-heatmaps)
  (c) the same pipeline through Triton (tritonserver from nvidia-pytriton, python backend running
      the same ONNX with onnxruntime; production would use Triton's onnxruntime backend)

Prints (b)/(a) and (c)/(a) throughput ratios, and CPU milliseconds per image (this process, its
decode processes and, for (c), the Triton server with its python-backend stubs): on a machine
shared with other jobs wall-clock throughput is noise, CPU cost per image is not. The broker is
not in the loop (RabbitMQ publish confirms are measured by the system benchmarks); the pipeline is
exactly what the service runs per message. Images: the DICOM files in ../shared/data/dicom, cycled to --images events.

    python bench/inference.py                      # committed model, 240 images, batch 1/8/32
    python bench/inference.py --no-triton --json var/bench/inference.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import Progress  # noqa: E402
from rich.table import Table  # noqa: E402

from bench.service_pipeline import bench_pipeline, cpu_seconds, events_for, median_run, stats  # noqa: E402
from services.inference.runtime import ModelRepository, OnnxRuntime, TritonRuntime  # noqa: E402
from services.inference.worker import load_image  # noqa: E402

console = Console(width=130)
DEFAULT_REPOSITORY = ROOT / "deploy" / "triton" / "model_repository"
DEFAULT_DICOM = ROOT.parent / "shared" / "data" / "dicom"


def bench_raw(runtime: OnnxRuntime, tensors: np.ndarray, batch: int) -> dict[str, float]:
    runtime.run_sync(tensors[:batch])  # warm-up
    latencies: list[float] = []
    cpu0 = cpu_seconds()
    started = time.perf_counter()
    for i in range(0, len(tensors), batch):
        t0 = time.perf_counter()
        chunk = tensors[i : i + batch]
        runtime.run_sync(chunk)
        latencies += [(time.perf_counter() - t0) * 1000.0] * len(chunk)
    wall = time.perf_counter() - started
    return stats(wall, len(tensors), latencies, cpu_seconds() - cpu0)


async def run(args: argparse.Namespace, files: list[Path]) -> dict:
    repository = ModelRepository(Path(args.repository), args.model)
    # (a) gets onnxruntime at its fastest alone (threads spin between runs); (b) runs the service's
    # own settings (no spinning, so the decode threads get the cores).
    raw = OnnxRuntime(repository, threads=args.threads, spin=True)
    embedded = OnnxRuntime(repository, threads=args.threads, spin=args.spin)
    await raw.start()
    await embedded.start()
    size = embedded.input_size
    events = events_for(files, args.images)
    tensors = np.stack([load_image(e.image.storage_uri, e.image.sha256, size).tensor for e in events])
    results: dict = {
        "model": f"{args.model} v{embedded.model_version}",
        "input_size": size,
        "images": args.images,
        "cpu_count": os.cpu_count(),
        "ort_threads": args.threads or "default",
        "heatmaps": not args.no_heatmaps,
        "repeats": args.repeats,
        "decode": f"{args.decode_processes} processes" if args.decode_processes else f"{args.decode_workers} threads",
        "rows": {},
    }
    heatmap_root = Path(tempfile.mkdtemp(prefix="pt-bench-heatmaps-"))
    triton = None
    triton_runtime = None
    try:
        if not args.no_triton:
            from services.inference.tools.local_triton import LocalTriton
            from services.inference.triton_python import MODEL_PY, python_backend_config

            repo = heatmap_root / "triton-repo"
            vdir = repo / args.model / embedded.model_version
            vdir.mkdir(parents=True)
            src = repository.model_dir / embedded.model_version
            for f in ("model.onnx", "metadata.json"):
                shutil.copy2(src / f, vdir / f)
            shutil.copy2(MODEL_PY, vdir / "model.py")
            (repo / args.model / "config.pbtxt").write_text(
                python_backend_config(args.model, size, intra_op_threads=args.threads, max_batch_size=64)
            )
            triton = LocalTriton(repo, load_models=(args.model,)).start()
            triton_runtime = TritonRuntime(triton.grpc_url, ModelRepository(repo, args.model))
            await triton_runtime.start()

        batches = [int(b) for b in args.batch_sizes.split(",")]
        paths = 3 if triton_runtime is not None else 2
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("benchmarking", total=len(batches) * paths * args.repeats)
            for b in batches:
                # the paths take turns, `repeats` times; the run with the median throughput is kept,
                # so a burst of load from other processes does not favour one path
                runs: dict[str, list[dict[str, float]]] = {"raw_onnxruntime": [], "service_embedded": []}
                if triton_runtime is not None:
                    runs["service_triton"] = []
                for _ in range(args.repeats):
                    runs["raw_onnxruntime"].append(bench_raw(raw, tensors, b))
                    progress.advance(task)
                    hm = None if args.no_heatmaps else heatmap_root / f"embedded-{b}"
                    runs["service_embedded"].append(
                        await bench_pipeline(
                            embedded, events, b, hm, args.decode_workers, args.max_wait_ms, args.decode_processes
                        )
                    )
                    progress.advance(task)
                    if triton_runtime is not None:
                        hm = None if args.no_heatmaps else heatmap_root / f"triton-{b}"
                        runs["service_triton"].append(
                            await bench_pipeline(
                                triton_runtime,
                                events,
                                b,
                                hm,
                                args.decode_workers,
                                args.max_wait_ms,
                                args.decode_processes,
                                (triton.process.pid,) if triton and triton.process else (),
                            )
                        )
                        progress.advance(task)
                row: dict = {k: median_run(v) for k, v in runs.items()}
                raw_ips = row["raw_onnxruntime"]["images_per_s"]
                row["ratio_embedded_vs_raw"] = round(row["service_embedded"]["images_per_s"] / raw_ips, 3)
                if "service_triton" in row:
                    row["ratio_triton_vs_raw"] = round(row["service_triton"]["images_per_s"] / raw_ips, 3)
                raw_cpu = row["raw_onnxruntime"]["cpu_ms_per_image"]
                for key in ("service_embedded", "service_triton"):
                    if key in row and row[key]["cpu_ms_per_image"] > 0:
                        row[key]["cpu_efficiency_vs_raw"] = round(raw_cpu / row[key]["cpu_ms_per_image"], 3)
                results["rows"][str(b)] = row
    finally:
        await raw.close()
        await embedded.close()
        if triton_runtime is not None:
            await triton_runtime.close()
        if triton is not None:
            triton.cleanup()
        shutil.rmtree(heatmap_root, ignore_errors=True)
    return results


def show(results: dict) -> None:
    table = Table(
        title=f"inference benchmark — {results['model']}, {results['images']} images, {results['cpu_count']} CPUs, "
        f"heatmaps {'on' if results['heatmaps'] else 'off'}, median of {results['repeats']}"
    )
    for col in ("batch", "path", "images/s", "p50 ms", "p99 ms", "vs raw", "CPU ms/img", "CPU vs raw"):
        table.add_column(col, justify="right" if col not in ("path",) else "left")
    for b, row in results["rows"].items():
        for key, label, ratio in (
            ("raw_onnxruntime", "(a) raw onnxruntime", None),
            ("service_embedded", "(b) service, embedded", "ratio_embedded_vs_raw"),
            ("service_triton", "(c) service, Triton", "ratio_triton_vs_raw"),
        ):
            if key not in row:
                continue
            r = row[key]
            table.add_row(
                b,
                label,
                f"{r['images_per_s']:.1f}",
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{row[ratio]:.2f}" if ratio else "1.00",
                f"{r['cpu_ms_per_image']:.2f}",
                f"{r.get('cpu_efficiency_vs_raw', 1.0):.2f}",
            )
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repository", default=str(DEFAULT_REPOSITORY))
    ap.add_argument("--model", default="pneumonia")
    ap.add_argument("--dicom", default=str(DEFAULT_DICOM))
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its default)")
    ap.add_argument("--decode-workers", type=int, default=2)
    ap.add_argument("--decode-processes", type=int, default=0, help="PT_INFERENCE_DECODE_PROCESSES")
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--repeats", type=int, default=3, help="runs per path and batch size (median kept)")
    ap.add_argument(
        "--spin", action="store_true", help="let the service's onnxruntime threads spin (PT_INFERENCE_ORT_SPIN)"
    )
    ap.add_argument("--no-triton", action="store_true")
    ap.add_argument("--no-heatmaps", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    files = sorted(Path(args.dicom).glob("*.dcm"))
    if not files:
        raise SystemExit(f"no DICOM files in {args.dicom}")
    results = asyncio.run(run(args, files))
    show(results)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
