"""CPU milliseconds per image of the inference and labeling consumers' handlers, without the broker.

    python bench/consumers_cpu.py --n 200 --rounds 3            # both consumers, CPU ms per image
    python bench/consumers_cpu.py --n 200 --profile inference   # + cProfile of a synchronous run (top 25)
    python bench/consumers_cpu.py --only inference --decode-workers 2 --ort-threads 0   # other threads
    python bench/consumers_cpu.py --n 200 --breakdown           # CPU ms per image of each stage

Images: --n real chest X-rays from ../shared/data/kermany224 wrapped as DX DICOM (JPEG baseline,
224 x 224), exactly what bench/e2e.py sends (harness/system_dicom.make_study_set).

- inference: the service's `Pipeline.predict` (read + sha256 + decode + preprocess + input gate in
  decode threads, micro-batches through embedded onnxruntime, calibration, heatmap PNG), 32 images
  in flight (the service's prefetch);
- labeling: `ImageConsumer.handle` (duplicate check, decode, input gate, render the PNG, insert the
  task) on a migrated SQLite database, 32 in flight; `--no-labeling-gate`: without the input gate
  (PT_LABELING_GATE=false), to measure what the gate adds.

Per round: CPU time (user + system, every thread of this process) over the round / images, its
system (kernel) part, and images/s (wall clock: only meaningful on a quiet machine). The
broker (aio-pika, publish confirms, acks) is not in the loop: bench/e2e.py measures the services
whole. --profile runs the same work in the main thread under cProfile (decode threads hide it).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import hashlib
import io
import os
import pstats
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from harness.system_dicom import make_study_set  # noqa: E402
from services.core.contracts import ImageReceived  # noqa: E402

SHARED = Path(os.environ.get("PT_SHARED_DATA", ROOT.parent / "shared" / "data"))
REPOSITORY = ROOT / "deploy" / "triton" / "model_repository"


def events_for(files: list[Path], tag: str) -> list[ImageReceived]:
    out = []
    for i, p in enumerate(files):
        e = ImageReceived(triage_eligible=True)
        e.image.sop_instance_uid = f"1.2.826.0.1.3680043.8.498.77.{tag}.{i}"
        e.image.study_instance_uid = f"1.2.826.0.1.3680043.8.498.78.{tag}.{i}"
        e.image.storage_uri = p.resolve().as_uri()
        e.image.sha256 = hashlib.sha256(p.read_bytes()).hexdigest()
        out.append(e)
    return out


@dataclass
class FakeEnvelope:  # what the consumers read of services.core.broker.Envelope
    payload: Any
    routing_key: str = "image.received"
    redelivered: bool = False


async def run_bounded(coros: list[Any], limit: int = 32) -> None:
    sem = asyncio.Semaphore(limit)

    async def one(c: Any) -> None:
        async with sem:
            await c

    await asyncio.gather(*(one(c) for c in coros))


SYSTEM: dict[str, list[float]] = {}  # of which system (kernel) CPU, per round
RATE: dict[str, list[float]] = {}  # images/s (wall clock: depends on what else the machine runs)


def cpu() -> float:
    return time.process_time()  # user + system, all threads, nanosecond clock (os.times ticks 10 ms)


def sys_cpu() -> float:
    return os.times().system


async def inference_rounds(
    files: list[Path], rounds: int, work: Path, threads: int, decode_workers: int = 2
) -> list[float]:
    kind = "inference"
    from services.inference.config import DEFAULT_GATE_FILE
    from services.inference.runtime import ModelRepository, OnnxRuntime
    from services.inference.worker import Pipeline

    runtime = OnnxRuntime(ModelRepository(REPOSITORY, "pneumonia"), threads=threads)
    await runtime.start()
    pipeline = Pipeline(
        runtime, heatmap_dir=work / "heatmaps", gate_file=DEFAULT_GATE_FILE, decode_workers=decode_workers
    )
    pipeline.start()
    try:
        await run_bounded([pipeline.predict(e) for e in events_for(files[:32], "warm")])
        out = []
        for r in range(rounds):
            events = events_for(files, f"i{r}")
            c0, s0, w0 = cpu(), sys_cpu(), time.perf_counter()
            await run_bounded([pipeline.predict(e) for e in events])
            out.append((cpu() - c0) * 1000.0 / len(events))
            SYSTEM.setdefault(kind, []).append((sys_cpu() - s0) * 1000.0 / len(events))
            RATE.setdefault(kind, []).append(len(events) / (time.perf_counter() - w0))
        return out
    finally:
        await pipeline.close()
        await runtime.close()


async def labeling_rounds(files: list[Path], rounds: int, work: Path, gate: bool = True) -> list[float]:
    kind = "labeling"
    from services.core.db import make_engine, make_sessionmaker, upgrade
    from services.labeling.consumer import ImageConsumer
    from services.labeling.job import load_job
    from services.labeling.models import Base

    engine = make_engine(f"sqlite+aiosqlite:///{work / 'labeling.db'}")
    await upgrade(engine, "labeling", Base.metadata)
    sessions = make_sessionmaker(engine)
    from services.labeling.config import DEFAULT_JOB_FILE, LabelingSettings

    gate_file = LabelingSettings(labeling_gate=gate).resolved_gate_file()
    consumer = ImageConsumer(sessions, load_job(DEFAULT_JOB_FILE), work / "render", 1024, gate_file=gate_file)
    try:
        await run_bounded([consumer.handle(FakeEnvelope(e)) for e in events_for(files[:32], "warm")])
        out = []
        for r in range(rounds):
            events = events_for(files, f"l{r}")
            c0, s0, w0 = cpu(), sys_cpu(), time.perf_counter()
            await run_bounded([consumer.handle(FakeEnvelope(e)) for e in events])
            out.append((cpu() - c0) * 1000.0 / len(events))
            SYSTEM.setdefault(kind, []).append((sys_cpu() - s0) * 1000.0 / len(events))
            RATE.setdefault(kind, []).append(len(events) / (time.perf_counter() - w0))
        return out
    finally:
        await engine.dispose()


def profile_inference(files: list[Path], work: Path, threads: int) -> cProfile.Profile:
    """The inference pipeline's stages synchronously in this thread (batches of 16)."""
    from services.inference.config import DEFAULT_GATE_FILE
    from services.inference.heatmaps import save_heatmap
    from services.inference.runtime import ModelRepository, OnnxRuntime
    from services.inference.worker import load_image

    runtime = OnnxRuntime(ModelRepository(REPOSITORY, "pneumonia"), threads=threads)
    runtime.load()
    model = runtime.model(runtime.model_version)
    events = events_for(files, "p")
    prof = cProfile.Profile()
    prof.enable()
    for start in range(0, len(events), 16):
        chunk = events[start : start + 16]
        gate = str(DEFAULT_GATE_FILE)
        loaded = [load_image(e.image.storage_uri, e.image.sha256, runtime.input_size, gate) for e in chunk]
        import numpy as np

        out = runtime.run_sync(np.stack([x.tensor for x in loaded]))
        for i, (e, x) in enumerate(zip(chunk, loaded, strict=True)):
            float(model.calibration.apply(out.logits[i]))
            save_heatmap(work / "hm-prof", e.image.sop_instance_uid, out.cams[i], x.rows, x.columns, 192, "p", "1")
    prof.disable()
    return prof


def breakdown(files: list[Path], work: Path, threads: int) -> dict[str, float]:
    """CPU ms per image of each stage, run one after the other in this thread (process CPU time:
    onnxruntime's own threads included)."""
    import inspect

    import numpy as np
    import pydicom

    from services.core.gate import gate_image
    from services.core.imaging import display_array, to_png
    from services.inference.config import DEFAULT_GATE_FILE
    from services.inference.heatmaps import save_heatmap
    from services.inference.preprocess import preprocess_array
    from services.inference.runtime import ModelRepository, OnnxRuntime
    from services.labeling.intake import prepare_work_image
    from services.labeling.render import cached_png

    runtime = OnnxRuntime(ModelRepository(REPOSITORY, "pneumonia"), threads=threads)
    runtime.load()
    gate_file = str(DEFAULT_GATE_FILE)
    # the service's gate call: with the display image decoded for the model (or, before it could
    # take one, decoding its own)
    reuse = "display" in inspect.signature(gate_image).parameters
    spent: dict[str, float] = {}

    def timed(stage: str, fn: Any, *a: Any, **kw: Any) -> Any:
        c0 = cpu()
        out = fn(*a, **kw)
        spent[stage] = spent.get(stage, 0.0) + cpu() - c0
        return out

    tensors, shapes = [], []
    for path in files:
        data = timed("inference: read + sha256", path.read_bytes)
        timed("inference: read + sha256", lambda d=data: hashlib.sha256(d).hexdigest())
        ds = timed("inference: dcmread", pydicom.dcmread, io.BytesIO(data))
        display = timed("inference: pixel decode + display image", display_array, ds)
        tensors.append(timed("inference: preprocess", preprocess_array, display, runtime.input_size))
        if reuse:
            timed("inference: input gate", gate_image, ds, gate_file, display)
        else:
            timed("inference: input gate", gate_image, ds, gate_file)
        shapes.append(display.shape)
    batch = np.stack(tensors)
    cams = []
    for start in range(0, len(files), 16):
        cams += list(timed("inference: onnxruntime (batches of 16)", runtime.run_sync, batch[start : start + 16]).cams)
    for i, cam in enumerate(cams):
        rows, cols = shapes[i]
        timed(
            "inference: heatmap (render, PNG, write)",
            save_heatmap,
            work / "hm",
            f"1.2.3.{i}",
            cam,
            rows,
            cols,
            192,
            "p",
            "1",
        )
    for i, path in enumerate(files):
        display = display_array(pydicom.dcmread(path))
        timed("labeling: PNG encode (to_png)", to_png, display, 1024)
        timed("labeling: render total (dcmread, decode, PNG, write)", cached_png, work / "render", f"t{i}", path, 1024)
        timed("labeling: input gate (on the decoded image)", gate_image, pydicom.dcmread(path), gate_file, display)
        timed(
            "labeling: gate + render (one dcmread and decode)",
            prepare_work_image,
            work / "render-gated",
            f"t{i}",
            path,
            1024,
            gate_file,
        )
    return {stage: seconds * 1000.0 / len(files) for stage, seconds in spent.items()}


async def labeling_db_rounds(files: list[Path], rounds: int, work: Path) -> list[float]:
    """ImageConsumer.handle with a render that writes nothing: the duplicate check, the insert, asyncio."""
    from services.core.db import make_engine, make_sessionmaker, upgrade
    from services.labeling.config import DEFAULT_JOB_FILE
    from services.labeling.consumer import ImageConsumer
    from services.labeling.intake import Prepared
    from services.labeling.job import load_job
    from services.labeling.models import Base

    engine = make_engine(f"sqlite+aiosqlite:///{work / 'labeling-db.db'}")
    await upgrade(engine, "labeling", Base.metadata)

    def no_render(cache_dir: Path, task_id: str, source: Path, max_side: int) -> Prepared:
        return Prepared(cache_dir / f"{task_id}.png", None)

    sessions = make_sessionmaker(engine)
    consumer = ImageConsumer(sessions, load_job(DEFAULT_JOB_FILE), work / "none", 1024, prepare=no_render)
    try:
        out = []
        for r in range(rounds):
            events = events_for(files, f"db{r}")
            c0 = cpu()
            await run_bounded([consumer.handle(FakeEnvelope(e)) for e in events])
            out.append((cpu() - c0) * 1000.0 / len(events))
        return out
    finally:
        await engine.dispose()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--only", choices=["inference", "labeling"], default=None)
    ap.add_argument("--profile", choices=["inference"], default=None)
    ap.add_argument("--breakdown", action="store_true", help="CPU ms per image of each stage, one at a time")
    ap.add_argument("--no-labeling-gate", action="store_true", help="labeling without the input gate")
    ap.add_argument(
        "--labeling-gate-ab", action="store_true", help="labeling with and without the input gate, alternating rounds"
    )
    ap.add_argument("--ort-threads", type=int, default=None, help="onnxruntime threads (default: the service's)")
    ap.add_argument("--decode-workers", type=int, default=None, help="decode threads (default: the service's)")
    args = ap.parse_args()
    from services.inference.config import InferenceSettings

    settings = InferenceSettings()  # the service's defaults (and PT_INFERENCE_* from the environment)
    if args.decode_workers is None:
        args.decode_workers = settings.decode_workers
    if args.ort_threads is None:
        args.ort_threads = settings.ort_threads
    print(f"inference: {args.decode_workers} decode thread(s), {args.ort_threads or 'default'} onnxruntime thread(s)")
    with tempfile.TemporaryDirectory(prefix="pt-cons-") as tmp:
        work = Path(tmp)
        files = [m.path for m in make_study_set(SHARED, work / "dicom", args.n)]
        if args.breakdown:
            for stage, ms in breakdown(files, work, args.ort_threads).items():
                print(f"{stage:58s} {ms:6.2f} CPU ms per image")
            db = asyncio.run(labeling_db_rounds(files, args.rounds, work))
            print(
                f"{'labeling: task DB + asyncio (handle, no render)':58s} {statistics.median(db):6.2f} CPU ms per image"
            )
            return
        if args.profile == "inference":
            prof = profile_inference(files, work, args.ort_threads)
            pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            return
        results: dict[str, list[float]] = {}
        if args.labeling_gate_ab:
            for r in range(args.rounds):
                for gate in (True, False):
                    name = "labeling+gate" if gate else "labeling-gate"
                    run = work / f"ab{r}-{name}"
                    run.mkdir()
                    SYSTEM["labeling"], RATE["labeling"] = [], []
                    results.setdefault(name, []).extend(asyncio.run(labeling_rounds(files, 1, run, gate)))
                    SYSTEM.setdefault(name, []).extend(SYSTEM["labeling"])
                    RATE.setdefault(name, []).extend(RATE["labeling"])
        elif args.only in (None, "inference"):
            results["inference"] = asyncio.run(
                inference_rounds(files, args.rounds, work, args.ort_threads, args.decode_workers)
            )
        if not args.labeling_gate_ab and args.only in (None, "labeling"):
            results["labeling"] = asyncio.run(labeling_rounds(files, args.rounds, work, not args.no_labeling_gate))
        for name, values in results.items():
            spread = f"min {min(values):.2f}, max {max(values):.2f}"
            print(
                f"{name:10s} CPU ms per image: median {statistics.median(values):.2f} ({spread}; "
                f"{len(values)} rounds of {args.n}) rounds: {', '.join(f'{v:.2f}' for v in values)}; "
                f"of which system {statistics.median(SYSTEM[name]):.2f}; {statistics.median(RATE[name]):.0f} images/s"
            )


if __name__ == "__main__":
    main()
