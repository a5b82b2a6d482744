"""Ingest benchmark: C-STORE throughput and per-image latency, ours vs dcmtk storescp vs Orthanc.

The same N DX files (made with make-dicom from ../shared/data JPEGs: explicit VR little endian,
--size x --size pixels, --bits stored, so storescu sends them without conversion) are sent over
loopback by dcmtk's storescu to, in turn:

  storescp      dcmtk's storescp writing each file to a directory (no validation, no fsync, no DB)
  orthanc       Orthanc 1.10 (Debian) with its SQLite index and file storage, default durability
                (SyncStorageArea=true: each file fsynced, index committed before the answer)
  pneumotriage  `pneumotriage ingest` as a process: validation of the header and of the Pixel
                Data's length and structure (no decode), sha256, content-addressed write with fsync,
                SQLite (WAL, synchronous=FULL) instance + outbox rows in one transaction, answered
                after the commit; its relay publishes every event to a real RabbitMQ node with
                publisher confirms during the run. Measured with PT_INGEST_WORKERS=1 (one process)
                and =2 (two processes accepting from one port, services/ingest/workers.py)

Every dcmtk process (the storescu senders, storescp, Orthanc, which uses dcmtk's network layer) runs
with TCP_NODELAY=1 in its environment: dcmtk's documented switch, without which Nagle's algorithm
stalls each C-STORE ~40 ms on loopback and both peers look ~20x slower than they are. Our SCP sets
TCP_NODELAY on its accepted sockets itself. The configuration is printed with the results, with the
load average before and after (the development machine is shared: compare ratios from one run).

Each target starts fresh (empty storage) for each run. --senders K splits the files over K storescu
processes (K associations at once). Throughput = images / wall time of the senders (first request
to last response). Per-image latency = from storescu's "Sending Store Request" to its "Received
Store Response" log line (millisecond timestamps via a log4cplus config): the data transfer plus
the SCP's work until it answers. For ours, the time until the outbox is drained (every event
confirmed by RabbitMQ) is printed as well.

    python bench/ingest.py                          # 500 images, 512x512, 12 bit, 1 and 4 senders,
                                                    # our ingest with 1 and 2 worker processes
    python bench/ingest.py --n 1000 --size 1024 --senders 2 --json var/bench/ingest.json
    python bench/ingest.py --n 200 --senders 1 4 --association-per-image   # association set-up cost

--association-per-image sends every file on an association of its own (one storescu process per
file, K lanes at once), as modalities and PACS that open an association per image or per study do:
throughput then includes the association's negotiation (storescu proposes its default ~120
presentation contexts) and release on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rich.console import Console  # noqa: E402
from rich.progress import track  # noqa: E402
from rich.table import Table  # noqa: E402

from harness.dicom_peers import DCMTK_NODELAY_ENV, STORESCU, Orthanc, StoreSCP, wait_for_port  # noqa: E402
from harness.processes import tree_cpu_seconds  # noqa: E402
from harness.rabbitmq import RabbitNode  # noqa: E402
from services.core.net import free_port  # noqa: E402
from services.ingest.tools.make_dicom import DicomOptions, make_dicom_file  # noqa: E402

console = Console(width=120)
SHARED = ROOT.parent / "shared" / "data" / "kermany224" / "train"
AE = "PNEUMOTRIAGE"
LOG_CONFIG = """\
log4cplus.rootLogger = INFO, console
log4cplus.appender.console = log4cplus::ConsoleAppender
log4cplus.appender.console.ImmediateFlush = true
log4cplus.appender.console.layout = log4cplus::PatternLayout
log4cplus.appender.console.layout.ConversionPattern = %D{%s.%q} %m%n
"""
# Orthanc's default, written out so the configuration is explicit: fsync each stored file.
ORTHANC_CONFIG = {"SyncStorageArea": True}


def configuration() -> list[str]:
    env = " ".join(f"{k}={v}" for k, v in DCMTK_NODELAY_ENV.items())
    return [
        f"storescu senders, storescp, Orthanc: environment {env} (dcmtk's switch for TCP_NODELAY)",
        f"Orthanc: {json.dumps(ORTHANC_CONFIG)} (its default: fsync per file), SQLite index",
        "storescp: +xa (accept all syntaxes), -od (one file per instance), no fsync, no index",
        "PneumoTriage ingest: TCP_NODELAY on accepted sockets, fsync file + SQLite commit before answering;"
        " PT_INGEST_WORKERS=W processes share the port (a row per W)",
    ]


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


@dataclass
class Result:
    target: str
    senders: int
    images: int
    ok: int
    seconds: float
    images_per_s: float
    mb_per_s: float
    p50_ms: float
    p99_ms: float
    events_drained_s: float | None = None
    cpu_ms_per_image: float | None = None  # CPU time of the target's processes while the senders ran
    rounds: int = 1
    latencies: list[float] = field(default_factory=list, repr=False)


def make_files(n: int, size: int, bits: int, out: Path) -> list[Path]:
    jpegs = sorted((SHARED / "NORMAL").glob("*.jpeg")) + sorted((SHARED / "PNEUMONIA").glob("*.jpeg"))
    step = max(1, len(jpegs) // n)
    chosen = (jpegs[::step] + jpegs)[:n]
    opts = DicomOptions(transfer_syntax="explicit", bits=bits, size=size, uid_salt="bench")
    return [make_dicom_file(p, out, opts) for p in track(chosen, description=f"make-dicom {n} x {size}px {bits} bit")]


# --association-per-image: every file on an association of its own (modalities and some PACS
# forward that way), instead of one association per sender for all its files
PER_IMAGE = False


def _sender_lane(cmd: list[str], chunk: list[Path], log_path: Path) -> None:
    """One storescu process per file, one after the other (the --association-per-image mode)."""
    env = {**os.environ, **DCMTK_NODELAY_ENV}
    with open(log_path, "w") as log:
        for path in chunk:
            subprocess.run([*cmd, str(path)], stdout=log, stderr=subprocess.STDOUT, env=env, timeout=600)


def send(port: int, called_ae: str, files: list[Path], senders: int, work: Path) -> tuple[float, int, list[float]]:
    """Run K storescu processes at once (or K lanes of one storescu per file); returns (wall seconds,
    successes, per-image latencies in s)."""
    cfg = work / "storescu-log.cfg"
    cfg.write_text(LOG_CONFIG)
    chunks = [files[i::senders] for i in range(senders)]
    procs = []
    lanes = []
    started = time.perf_counter()
    for i, chunk in enumerate(chunks):
        cmd = [STORESCU, "-lc", str(cfg), "-aet", f"BENCH{i}", "-aec", called_ae, "-to", "60", "127.0.0.1", str(port)]
        if PER_IMAGE:
            lane = threading.Thread(target=_sender_lane, args=(cmd, chunk, work / f"storescu-{i}.log"))
            lane.start()
            lanes.append(lane)
            continue
        log = open(work / f"storescu-{i}.log", "w")
        env = {**os.environ, **DCMTK_NODELAY_ENV}
        procs.append((subprocess.Popen([*cmd, *map(str, chunk)], stdout=log, stderr=subprocess.STDOUT, env=env), log))
    for proc, log in procs:
        proc.wait(timeout=3600)
        log.close()
    for lane in lanes:
        lane.join()
    wall = time.perf_counter() - started
    ok, latencies = 0, []
    for i in range(senders):
        sent_at: float | None = None
        for line in (work / f"storescu-{i}.log").read_text().splitlines():
            stamp, _, message = line.partition(" ")
            if message.startswith("Sending Store Request"):
                sent_at = float(stamp)
            elif message.startswith("Received Store Response") and sent_at is not None:
                latencies.append(float(stamp) - sent_at)
                ok += "(Success)" in message
                sent_at = None
    return wall, ok, latencies


def summarize(target: str, senders: int, files: list[Path], wall: float, ok: int, lat: list[float]) -> Result:
    mb = sum(f.stat().st_size for f in files) / 1e6
    lat_sorted = sorted(lat) or [float("nan")]
    p99 = lat_sorted[min(len(lat_sorted) - 1, round(0.99 * (len(lat_sorted) - 1)))]
    return Result(
        target,
        senders,
        len(files),
        ok,
        round(wall, 2),
        round(len(files) / wall, 1),
        round(mb / wall, 1),
        round(statistics.median(lat_sorted) * 1000, 1),
        round(p99 * 1000, 1),
        latencies=lat,
    )


def combine(runs: list[Result]) -> Result:
    """Median throughput over rounds; latency percentiles over every image of every round."""
    first = runs[0]
    lat = sorted(x for r in runs for x in r.latencies) or [float("nan")]
    p99 = lat[min(len(lat) - 1, round(0.99 * (len(lat) - 1)))]
    drained = [r.events_drained_s for r in runs if r.events_drained_s is not None]
    return Result(
        first.target,
        first.senders,
        first.images,
        min(r.ok for r in runs),
        round(statistics.median(r.seconds for r in runs), 2),
        round(statistics.median(r.images_per_s for r in runs), 1),
        round(statistics.median(r.mb_per_s for r in runs), 1),
        round(statistics.median(lat) * 1000, 1),
        round(p99 * 1000, 1),
        round(statistics.median(drained), 2) if drained else None,
        round(statistics.median(r.cpu_ms_per_image for r in runs if r.cpu_ms_per_image is not None), 2),
        rounds=len(runs),
    )


def run_storescp(files: list[Path], senders: int, work: Path) -> Result:
    with StoreSCP(aet=AE, base_dir=work / "storescp", env=DCMTK_NODELAY_ENV) as scp:
        assert scp.process is not None
        cpu = tree_cpu_seconds(scp.process.pid)
        wall, ok, lat = send(scp.port, AE, files, senders, work)
        cpu = tree_cpu_seconds(scp.process.pid) - cpu
        assert len(scp.received()) == len(files), "storescp did not receive everything"
    result = summarize("dcmtk storescp", senders, files, wall, ok, lat)
    result.cpu_ms_per_image = round(cpu * 1000 / len(files), 2)
    return result


def run_orthanc(files: list[Path], senders: int, work: Path) -> Result:
    with Orthanc(aet=AE, base_dir=work / "orthanc", env=DCMTK_NODELAY_ENV, config_overrides=ORTHANC_CONFIG) as pacs:
        assert pacs.process is not None
        cpu = tree_cpu_seconds(pacs.process.pid)
        wall, ok, lat = send(pacs.dicom_port, AE, files, senders, work)
        cpu = tree_cpu_seconds(pacs.process.pid) - cpu
        count = pacs.get("/statistics")["CountInstances"]
        assert count == len(files), f"Orthanc holds {count} instances"
    result = summarize("Orthanc", senders, files, wall, ok, lat)
    result.cpu_ms_per_image = round(cpu * 1000 / len(files), 2)
    return result


def wait_healthy(http_port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    """Until /healthz answers 200 (with several workers: every worker accepting)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ingest exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=5) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise TimeoutError("ingest not healthy")


def ours_name(workers: int, fast_path: bool = True) -> str:
    name = "pneumotriage ingest" if workers == 1 else f"pneumotriage ingest, {workers} workers"
    return name if fast_path else f"{name}, pynetdicom path"


def run_ours(
    files: list[Path],
    senders: int,
    work: Path,
    rabbit: RabbitNode,
    extra: dict[str, str],
    workers: int = 1,
    fast_path: bool = True,
) -> Result:
    data_dir = work / "pneumotriage"
    port, http_port = free_port(), free_port()
    env = {
        **os.environ,
        "PT_DATA_DIR": str(data_dir),
        "PT_AMQP_URL": rabbit.url,
        "PT_INGEST_PORT": str(port),
        "PT_INGEST_HOST": "127.0.0.1",
        "PT_INGEST_HTTP_PORT": str(http_port),
        "PT_INGEST_AE_TITLE": AE,
        "PT_INGEST_WORKERS": str(workers),
        **extra,
        **({} if fast_path else {"PT_INGEST_FAST_PATH": "false"}),
    }
    data_dir.mkdir(parents=True)
    with open(data_dir / "ingest.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "services.cli", "ingest"], env=env, stdout=log, stderr=log)
    try:
        wait_for_port("127.0.0.1", port, 120, proc)
        wait_for_port("127.0.0.1", http_port, 60, proc)
        wait_healthy(http_port, proc)
        started = time.perf_counter()
        cpu = tree_cpu_seconds(proc.pid)
        wall, ok, lat = send(port, AE, files, senders, work)
        cpu = tree_cpu_seconds(proc.pid) - cpu
        db = sqlite3.connect(data_dir / "ingest.db")
        while True:  # until every event is confirmed by the broker
            (backlog,) = db.execute("SELECT count(*) FROM ingest_outbox WHERE published_at IS NULL").fetchone()
            (stored,) = db.execute("SELECT count(*) FROM ingest_instances").fetchone()
            if backlog == 0 or time.perf_counter() - started > 600:
                break
            time.sleep(0.05)
        drained = time.perf_counter() - started
        db.close()
        assert stored == len(files), f"ingest stored {stored} of {len(files)}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    result = summarize(ours_name(workers, fast_path), senders, files, wall, ok, lat)
    result.events_drained_s = round(drained, 2)
    result.cpu_ms_per_image = round(cpu * 1000 / len(files), 2)
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=500, help="images (>= 500 for the reported figures)")
    ap.add_argument("--size", type=int, default=512, help="image side in pixels")
    ap.add_argument("--bits", type=int, default=12, choices=[8, 12, 16])
    ap.add_argument("--senders", type=int, nargs="+", default=[1, 4], help="parallel storescu processes")
    ap.add_argument("--rounds", type=int, default=1, help="repeat all targets; median throughput is reported")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--targets", nargs="+", default=["storescp", "orthanc", "ours"], choices=["storescp", "orthanc", "ours"]
    )
    ap.add_argument(
        "--workers", type=int, nargs="+", default=[1, 2], help="our ingest with PT_INGEST_WORKERS=W, for each W"
    )
    ap.add_argument(
        "--library-path",
        action="store_true",
        help="also run our ingest with PT_INGEST_FAST_PATH=false (pynetdicom's own path) and print fast/library",
    )
    ap.add_argument("--ingest-env", nargs="*", default=[], metavar="PT_X=V", help="extra settings for our ingest")
    ap.add_argument(
        "--association-per-image",
        action="store_true",
        help="every file on an association of its own (one storescu per file); measures association set-up",
    )
    args = ap.parse_args()
    global PER_IMAGE
    PER_IMAGE = args.association_per_image

    extra = dict(kv.split("=", 1) for kv in args.ingest_env)
    work = Path(tempfile.mkdtemp(prefix="pt-bench-ingest-"))
    rabbit = RabbitNode()
    for line in configuration():
        console.print(f"config: {line}")
    if extra:
        console.print(f"config: PneumoTriage ingest settings {extra}")
    load_before = load_average()
    console.print(f"load average (1/5/15 min) before: {load_before} on {os.cpu_count()} CPUs")
    try:
        files = make_files(args.n, args.size, args.bits, work / "files")
        mb = sum(f.stat().st_size for f in files) / 1e6
        console.print(f"{len(files)} files, {mb:.0f} MB; starting RabbitMQ for the ingest's relay")
        rabbit.start()
        runs: dict[tuple[str, int], list[Result]] = {}
        for rnd in range(1, args.rounds + 1):  # targets interleaved, so load changes hit all of them
            for senders in args.senders:
                runners: list[tuple[str, str, Any]] = [
                    ("storescp", "storescp", lambda w, s=senders: run_storescp(files, s, w)),
                    ("orthanc", "orthanc", lambda w, s=senders: run_orthanc(files, s, w)),
                ]
                runners += [
                    ("ours", f"ours{n}", lambda w, s=senders, n=n: run_ours(files, s, w, rabbit, extra, n))
                    for n in args.workers
                ]
                if args.library_path:
                    runners += [
                        ("ours", f"lib{n}", lambda w, s=senders, n=n: run_ours(files, s, w, rabbit, extra, n, False))
                        for n in args.workers
                    ]
                for name, label, runner in runners:
                    if name not in args.targets:
                        continue
                    target_dir = work / f"{label}-{senders}-{rnd}"
                    target_dir.mkdir()
                    r = runner(target_dir)
                    console.print(f"round {rnd}: {r.target}, {senders} sender(s): {r.images_per_s} images/s")
                    runs.setdefault((label, senders), []).append(r)
                    shutil.rmtree(target_dir, ignore_errors=True)
        results = [combine(v) for v in runs.values()]
    finally:
        rabbit.stop()
        shutil.rmtree(work, ignore_errors=True)

    load_after = load_average()
    title = f"C-STORE over loopback: {args.n} DX images, {args.size}x{args.size}, {args.bits} bit"
    title += f", median of {args.rounds} round(s)"
    if PER_IMAGE:
        title += ", one association per image"
    table = Table(title=title)
    for col in ("target", "senders", "ok", "images/s", "MB/s", "p50 ms", "p99 ms", "CPU ms/img", "events out (s)"):
        table.add_column(col, justify="right" if col != "target" else "left", no_wrap=True)
    for r in results:
        drained = "" if r.events_drained_s is None else f"{r.events_drained_s}"
        table.add_row(
            r.target, str(r.senders), f"{r.ok}/{r.images}", str(r.images_per_s), str(r.mb_per_s),
            str(r.p50_ms), str(r.p99_ms), str(r.cpu_ms_per_image), drained,
        )  # fmt: skip
    console.print(table)
    for senders in args.senders:
        by = {r.target: r for r in results if r.senders == senders}
        if "Orthanc" not in by or "dcmtk storescp" not in by:
            continue
        for workers in args.workers:
            ours = by.get(ours_name(workers))
            if ours is None:
                continue
            console.print(
                f"{senders} sender(s), {workers} worker(s): ours/Orthanc throughput "
                f"{ours.images_per_s / by['Orthanc'].images_per_s:.2f}x, "
                f"ours/storescp {ours.images_per_s / by['dcmtk storescp'].images_per_s:.2f}x; "
                f"p50 latency ours/Orthanc {ours.p50_ms / by['Orthanc'].p50_ms:.2f}x, "
                f"p99 latency ours/Orthanc {ours.p99_ms / by['Orthanc'].p99_ms:.2f}x"
            )
    for senders in args.senders:
        by = {r.target: r for r in results if r.senders == senders}
        for workers in args.workers:
            fast, lib = by.get(ours_name(workers)), by.get(ours_name(workers, False))
            if fast is None or lib is None:
                continue
            console.print(
                f"{senders} sender(s), {workers} worker(s): fast path / pynetdicom path throughput "
                f"{fast.images_per_s / lib.images_per_s:.2f}x, CPU ms per image {fast.cpu_ms_per_image} vs "
                f"{lib.cpu_ms_per_image}, p99 {fast.p99_ms} vs {lib.p99_ms} ms"
            )
    console.print(f"load average (1/5/15 min) before: {load_before}, after: {load_after}; {os.cpu_count()} CPUs")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        rows = [{k: v for k, v in asdict(r).items() if k != "latencies"} for r in results]
        meta = {"configuration": configuration(), "load_before": load_before, "load_after": load_after}
        args.json.write_text(json.dumps({"meta": meta, "results": rows}, indent=2))


if __name__ == "__main__":
    main()
