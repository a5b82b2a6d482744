"""The inference service's per-image path, timed without the broker: shared by bench/inference.py
(service against raw onnxruntime, embedded and Triton) and bench/model.py (every model version's
served images/s on that path).

`bench_pipeline` runs `services/inference/worker.py`'s `Pipeline` (what `InferenceService` builds):
read + sha256 + DICOM decode + preprocessing (+ the input gate when given its file) in the decode
threads or processes, the micro-batcher, the runtime's inference, calibration, and the heatmap PNG
(`services/inference/heatmaps.py`) when given a folder, with a bounded number of images in flight
as RabbitMQ's prefetch bounds them. Not a helper of the service: a benchmark's own module.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path

import numpy as np

from services.core.contracts import ImageReceived
from services.inference.runtime import InferenceRuntime
from services.inference.worker import Pipeline


def events_for(files: list[Path], n: int) -> list[ImageReceived]:
    """n image.received events for `files` (cycled), each with its file URI and sha256."""
    digests = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
    out = []
    for i in range(n):
        p = files[i % len(files)]
        e = ImageReceived(triage_eligible=True)
        e.image.sop_instance_uid = f"1.2.826.0.1.3680043.8.498.9.{i}"
        e.image.storage_uri = p.resolve().as_uri()
        e.image.sha256 = digests[p]
        out.append(e)
    return out


def cpu_seconds(pids: tuple[int, ...] = (), trees: tuple[int, ...] = ()) -> float:
    """CPU time (user + system) used so far by this process, by `pids`, and by the processes in
    `trees` with all their descendants (Linux /proc; processes must live across both readings)."""
    ticks = os.sysconf("SC_CLK_TCK")
    table: dict[int, tuple[int, int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                raw = fh.read()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        table[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))
    keep = set(trees)
    grew = True
    while grew:
        extra = {pid for pid, (ppid, _) in table.items() if ppid in keep and pid not in keep}
        keep |= extra
        grew = bool(extra)
    keep |= {os.getpid(), *pids}
    return sum(table[pid][1] for pid in keep if pid in table) / ticks


def stats(wall_s: float, n: int, latencies_ms: list[float], cpu_s: float = 0.0) -> dict[str, float]:
    lat = np.asarray(latencies_ms, dtype=np.float64)
    return {
        "images": n,
        "wall_s": round(wall_s, 3),
        "images_per_s": round(n / wall_s, 1),
        "cpu_ms_per_image": round(cpu_s * 1000.0 / n, 2),
        "p50_ms": round(float(np.percentile(lat, 50)), 2),
        "p99_ms": round(float(np.percentile(lat, 99)), 2),
    }


def median_run(runs: list[dict[str, float]]) -> dict[str, float]:
    """The run with the median images/s (all runs' images/s kept beside it)."""
    ordered = sorted(runs, key=lambda r: r["images_per_s"])
    best = dict(ordered[len(ordered) // 2])
    best["all_images_per_s"] = [r["images_per_s"] for r in runs]  # type: ignore[assignment]
    return best


async def bench_pipeline(
    runtime: InferenceRuntime,
    events: list[ImageReceived],
    batch: int,
    heatmap_dir: Path | None,
    decode_workers: int,
    max_wait_ms: float,
    decode_processes: int = 0,
    cpu_trees: tuple[int, ...] = (),
    gate_file: Path | None = None,
    in_flight: int = 0,
) -> dict[str, float]:
    """One timed pass of `events` through a fresh Pipeline (after a warm-up of 2 x `batch` of them).
    `in_flight`: images in flight at once, as the service's prefetch (0: max(2 x batch, batch + 4))."""
    pipeline = Pipeline(
        runtime,
        max_batch=batch,
        max_wait_ms=max_wait_ms,
        decode_workers=decode_workers,
        heatmap_dir=heatmap_dir,
        decode_processes=decode_processes,
        gate_file=gate_file,
    )
    pipeline.start()
    # like RabbitMQ's prefetch: a bounded number of messages in flight
    slots = asyncio.Semaphore(in_flight or max(2 * batch, batch + 4))
    latencies: list[float] = []

    async def one(event: ImageReceived) -> None:
        async with slots:
            prediction = await pipeline.predict(event)
            latencies.append(prediction.latency_ms)

    try:
        await asyncio.gather(*(one(e) for e in events[: 2 * batch]))  # warm-up
        latencies.clear()
        pool = pipeline.process_pool
        workers = tuple(pool._processes) if pool is not None else ()  # decode processes (alive until close)
        cpu0 = cpu_seconds(workers, cpu_trees)
        started = time.perf_counter()
        await asyncio.gather(*(one(e) for e in events))
        wall = time.perf_counter() - started
        return stats(wall, len(events), latencies, cpu_seconds(workers, cpu_trees) - cpu0)
    finally:
        await pipeline.close()
