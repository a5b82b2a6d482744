"""End-to-end benchmark: sustained images/s and C-STORE accepted -> first flag latency (model only),
with a per-stage breakdown, and each stage measured alone in the same run (the pipeline's ceiling).

    python bench/e2e.py --n 400 --associations 4 --alone 300 [--curve 0.25 0.5 0.75 0.9] [--json-out result.json]
    python bench/e2e.py --rate 20 [--rate-seconds 20] [--associations 4]   # one offered load only

Phase 1 (pipeline): the whole system (RabbitMQ, ingest, inference, labeling, aggregator as
processes, SQLite, embedded onnxruntime) receives N real chest X-rays over dcmtk storescu.
Per image, timestamps from the services' own databases give the stages:
  ingest      C-STORE accepted (DB commit)        -> image.received confirmed by the broker (outbox)
  inference   image.received published            -> prediction made (model + heatmap)
  aggregator queue  prediction made               -> stored by the aggregator (waiting in aggregator.events)
  aggregator  stored                              -> study's first flag
Phase 2 (alone): the consumers (inference, aggregator, labeling) are stopped, M more images are
sent (ingest alone: C-STORE throughput), then inference is started alone against the full queue
(its drain rate), then the aggregator alone against its full queue, then labeling (shown; it is
off the model-only path to a first flag, so not part of the ceiling). ceiling = the slowest stage
alone; pipeline/ceiling says how much of it the running system keeps. Since stages share the
machine's cores in the pipeline, the CPUs / (services' CPU ms per image) bound is printed too.
Targets (issue 24): pipeline efficiency = pipeline images/s / the shared-CPU bound >= 0.9 (the
retired "pipeline >= 0.85 x inference alone" is still printed, as pipeline / ceiling, no target).
Phase 3 (one study at a time, --single K): K single-image studies, each sent once the one before has
its first flag: C-STORE accepted -> first flag p50/p95/max. SLO: p95 <= 0.5 s.
Phase 4 (offered load, latency vs load): images arrive at a steady rate R (image i is sent at
t0 + i/R, over several associations, a study's images on one association) for --rate-seconds, at
25/50/75/90 % of the pipeline's capacity (its sustained images/s in phase 1; the ceiling when phase 1
did not run) (--curve), or at one given --rate. Per level: the rate achieved and C-STORE accepted ->
study's first flag p50/p95/p99. SLO: p95 <= 1 s at 50 % of the pipeline's capacity.
Queue depths are read over AMQP (passive declare), not with rabbitmqctl, so that polling does not
take CPU from the services being measured.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from harness.processes import tree_cpu_seconds  # noqa: E402
from harness.rabbitmq import RabbitNode  # noqa: E402
from harness.system_dicom import MadeImage, make_dx, pick_xrays  # noqa: E402
from harness.system_harness import SystemHarness, chunk_by_study  # noqa: E402
from harness.system_scenario import Batch, make_batch  # noqa: E402

console = Console(width=None if sys.stdout.isatty() else 150)
SHARED = Path(os.environ.get("PT_SHARED_DATA", REPO.parent / "shared" / "data"))


def ts(value: str | None) -> float | None:
    if not value:
        return None
    dt = datetime.fromisoformat(str(value))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def rows(db: Path, sql: str) -> list[tuple]:
    with closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        return conn.execute(sql).fetchall()


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "n": len(values),
        "p50": pct(values, 0.5),
        "p95": pct(values, 0.95),
        "p99": pct(values, 0.99),
        "mean": statistics.fmean(values) if values else float("nan"),
        "max": max(values) if values else float("nan"),
    }


def timeline(system: SystemHarness, uids: set[str]) -> dict[str, dict[str, float | None]]:
    """Per SOP instance: accepted, published, predicted, stored, first_flag, task (the labeling
    task's creation; epoch seconds)."""
    data = system.data_dir
    t: dict[str, dict[str, float | None]] = {u: {} for u in uids}
    for sop, received in rows(data / "ingest.db", "SELECT sop_instance_uid, received_at FROM ingest_instances"):
        if sop in t:
            t[sop]["accepted"] = ts(received)
    for cid, published in rows(
        data / "ingest.db", "SELECT correlation_id, published_at FROM ingest_outbox WHERE routing_key='image.received'"
    ):
        if cid in t:
            t[cid]["published"] = ts(published)
    agg = data / "aggregator.db"
    for sop, predicted, stored in rows(agg, "SELECT sop_uid, predicted_at, stored_at FROM aggregator_predictions"):
        if sop in t:
            t[sop]["predicted"] = ts(predicted)
            t[sop]["stored"] = ts(stored)
    for sop, created in rows(data / "labeling.db", "SELECT sop_instance_uid, created_at FROM labeling_tasks"):
        if sop in t:
            t[sop]["task"] = ts(created)
    study_flag = dict(rows(agg, "SELECT study_uid, first_flag_at FROM aggregator_studies"))
    for sop, study in rows(agg, "SELECT sop_uid, study_uid FROM aggregator_images"):
        if sop in t:
            t[sop]["first_flag"] = ts(study_flag.get(study))
            t[sop]["study"] = study  # type: ignore[assignment]
    return t


def wait_until(pred, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    with console.status(what):
        while not pred():
            if time.monotonic() > deadline:
                raise TimeoutError(what)
            time.sleep(0.5)


def wait_for_labeling(system: SystemHarness, sops: set[str], what: str) -> None:
    """Wait until every triage-eligible image in `sops` has its labeling task (or was refused by the
    input gate: a labeling_skipped_images row instead). Labeling runs at a
    lower CPU priority (PT_LABELING_CPU_NICE) and catches up after a burst; waiting keeps one
    phase's backlog out of the next one (the tasks' times come from timeline())."""
    data = system.data_dir
    eligible = {
        sop for sop, ok in rows(data / "ingest.db", "SELECT sop_instance_uid, triage_eligible FROM ingest_instances")
        if sop in sops and ok
    }  # fmt: skip

    def done() -> bool:
        tasks = {sop for (sop,) in rows(data / "labeling.db", "SELECT sop_instance_uid FROM labeling_tasks")}
        skipped = {sop for (sop,) in rows(data / "labeling.db", "SELECT sop_instance_uid FROM labeling_skipped_images")}
        return eligible <= tasks | skipped

    wait_until(done, 900, what)


def last_task(t: dict[str, dict[str, float | None]]) -> float:
    """When the last of these images' labeling tasks was created (epoch seconds)."""
    return max(float(v["task"]) for v in t.values() if v.get("task"))  # type: ignore[arg-type]


def count(db: Path, sql: str) -> int:
    try:
        return int(rows(db, sql)[0][0])
    except sqlite3.OperationalError:
        return 0


def cpu_seconds(system: SystemHarness, service: str) -> float:
    """CPU time (user + system) the service's process and its children (ingest workers) have used
    so far, from /proc."""
    return tree_cpu_seconds(system.children[service].pid)


def queue_ready(system: SystemHarness, *names: str) -> dict[str, int]:
    """Ready messages per queue, over AMQP (cheap: no rabbitmqctl VM start per poll)."""
    import aio_pika

    async def probe() -> dict[str, int]:
        conn = await aio_pika.connect(system.amqp_url)
        try:
            channel = await conn.channel()
            out = {}
            for name in names:
                q = await channel.declare_queue(name, passive=True)
                out[name] = int(q.declaration_result.message_count or 0)
            return out
        finally:
            await conn.close()

    return asyncio.run(probe())


def run(
    n: int,
    associations: int,
    alone: int,
    workdir: Path,
    curve: list[float],
    rates: list[float],
    rate_seconds: float,
    single: int = 0,
) -> dict[str, object]:
    result: dict[str, object] = {
        "n": n,
        "associations": associations,
        "alone_n": alone,
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
    }
    with console.status("making DICOM from the shared X-rays ..."):
        batch = make_batch(SHARED, workdir / "pipeline", n, seed=101) if n else None
        batch2 = make_batch(SHARED, workdir / "alone", alone, seed=202) if alone else None
    with RabbitNode() as rabbit:
        system = SystemHarness(rabbit, workdir / "system", env={"PT_LOG_LEVEL": "WARNING"}).start()
        try:
            if batch is not None:
                result["pipeline"] = phase_pipeline(system, batch, associations)
            if batch2 is not None:
                result["alone"] = phase_alone(system, batch2, associations)
                # the stages on the path to a model-only first flag (labeling is shown, not counted)
                stages = {k: v for k, v in result["alone"].items() if k != "labeling"}  # type: ignore[attr-defined]
                slowest = min(stages, key=lambda k: stages[k]["images_per_s"])  # type: ignore[index]
                ceiling = float(stages[slowest]["images_per_s"])  # type: ignore[index]
                result["ceiling_stage"] = slowest
                result["ceiling_images_per_s"] = ceiling
                if batch is not None:
                    result["pipeline_over_ceiling"] = result["pipeline"]["images_per_s"] / ceiling  # type: ignore[index]
            # the offered-load levels are fractions of the pipeline's capacity (issue 24), the ceiling
            # only when the pipeline was not measured
            if "pipeline" in result:
                result["capacity_images_per_s"] = result["pipeline"]["images_per_s"]  # type: ignore[index]
                result["capacity_basis"] = "pipeline"
            elif "ceiling_images_per_s" in result:
                result["capacity_images_per_s"] = result["ceiling_images_per_s"]
                result["capacity_basis"] = "ceiling (slowest stage alone; the pipeline was not measured)"
            if "capacity_images_per_s" in result:
                rates = [*rates, *(f * float(result["capacity_images_per_s"]) for f in curve)]  # type: ignore[arg-type]
            if single:
                with console.status(f"making {single} single-image studies ..."):
                    single_files = make_single_studies(workdir / "single", single)
                result["single"] = phase_single(system, single_files)
            levels = []
            for i, rate in enumerate(rates):
                count_n = max(20, round(rate * rate_seconds))
                with console.status(f"making {count_n} images for {rate:.1f} images/s ..."):
                    level_batch = make_batch(SHARED, workdir / f"rate{i}", count_n, seed=303 + i)
                level = phase_rate(system, level_batch, rate, associations)
                if "capacity_images_per_s" in result:
                    level["fraction_of_capacity"] = rate / float(result["capacity_images_per_s"])  # type: ignore[arg-type]
                levels.append(level)
            result["offered_load"] = levels
        finally:
            system.stop()
    result["loadavg_after"] = os.getloadavg()
    return result


LABELING_STAGE = "labeling task, off the flag path (accepted -> task)"


def make_single_studies(out_dir: Path, n: int) -> list[MadeImage]:
    """n single-image studies dated today."""
    from pydicom.uid import generate_uid

    return [
        make_dx(src, out_dir / f"single{i:04d}.dcm", 800000 + i, generate_uid(), generate_uid(), 1)
        for i, (src, _label) in enumerate(pick_xrays(SHARED, n, seed=707))
    ]


def phase_single(system: SystemHarness, images: list[MadeImage]) -> dict[str, object]:
    """One study at a time: each sent (storescu, one association) once the one before has its first
    flag; C-STORE accepted -> first flag per study."""
    agg, ingest = system.data_dir / "aggregator.db", system.data_dir / "ingest.db"
    latencies: list[float] = []
    loadavg = os.getloadavg()
    with console.status(f"one study at a time: {len(images)} studies ...") as status:
        for k, m in enumerate(images):
            system.send([m.path])
            study = m.study_instance_uid
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                flag = rows(agg, f"SELECT first_flag_at FROM aggregator_studies WHERE study_uid = '{study}'")
                if flag and flag[0][0]:
                    accepted = rows(
                        ingest,
                        f"SELECT received_at FROM ingest_instances WHERE sop_instance_uid = '{m.sop_instance_uid}'",
                    )
                    latencies.append(ts(flag[0][0]) - ts(accepted[0][0]))  # type: ignore[operator]
                    break
                time.sleep(0.02)
            status.update(f"one study at a time: {k + 1}/{len(images)}, last {latencies[-1] if latencies else 0:.2f} s")
    return {"studies": len(images), "flagged": len(latencies), "accepted_to_first_flag_s": summary(latencies),
            "loadavg_1m": loadavg[0]}  # fmt: skip


def stage_summaries(t: dict[str, dict[str, float | None]]) -> dict[str, dict[str, float]]:
    def stage(a: str, b: str) -> list[float]:
        return [v[b] - v[a] for v in t.values() if v.get(a) and v.get(b)]  # type: ignore[operator]

    return {
        "ingest (accepted -> published)": summary(stage("accepted", "published")),
        "inference (published -> predicted)": summary(stage("published", "predicted")),
        "aggregator queue (predicted -> stored)": summary(stage("predicted", "stored")),
        "aggregator (stored -> first flag)": summary(
            [max(0.0, v["first_flag"] - v["stored"]) for v in t.values() if v.get("stored") and v.get("first_flag")]  # type: ignore[operator]
        ),
        LABELING_STAGE: summary(stage("accepted", "task")),
    }


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    tick = os.sysconf("SC_CLK_TCK")
    return (sum(fields) - idle) / tick, sum(fields) / tick


def phase_pipeline(system: SystemHarness, batch: Batch, associations: int) -> dict[str, object]:
    agg = system.data_dir / "aggregator.db"
    started = time.time()
    services = list(system.children)
    cpu0 = {name: cpu_seconds(system, name) for name in services}
    busy0, total0 = machine_cpu()
    sent = system.send(batch.paths, associations=associations)
    acked = batch.acked_uids(sent)
    studies = {m.study_instance_uid for m in batch.images if m.sop_instance_uid in acked}
    wait_until(
        lambda: (
            count(agg, "SELECT count(*) FROM aggregator_studies WHERE first_flag_at IS NOT NULL") >= len(studies)
            and count(agg, "SELECT count(*) FROM aggregator_predictions") >= len(acked)
        ),
        900,
        f"pipeline: waiting for {len(studies)} studies to get their first flag ...",
    )
    # labeling yields the CPU to the flag path and finishes later: its CPU per image counts in full
    busy1, total1 = machine_cpu()
    wait_for_labeling(system, acked, "pipeline: labeling catching up ...")
    cpu = {name: cpu_seconds(system, name) - cpu0[name] for name in services}
    t = timeline(system, acked)
    accepted = [v["accepted"] for v in t.values() if v.get("accepted")]
    flagged = [v["first_flag"] for v in t.values() if v.get("first_flag")]
    # per study: first image accepted -> first flag
    per_study: dict[str, list[float]] = {}
    for v in t.values():
        if v.get("accepted") and v.get("first_flag"):
            per_study.setdefault(str(v["study"]), []).append(v["accepted"])  # type: ignore[arg-type]
    first_flag = {str(v["study"]): v["first_flag"] for v in t.values() if v.get("first_flag")}
    e2e = [first_flag[s] - min(acc) for s, acc in per_study.items()]  # type: ignore[operator]

    span = max(flagged) - min(accepted)  # type: ignore[type-var,operator]
    return {
        # CPU of each service per acknowledged image during the burst, and how busy the whole
        # machine was: when it is ~100 %, the pipeline is bound by the CPU all stages share
        "cpu_ms_per_image": {name: 1000 * c / max(1, len(acked)) for name, c in cpu.items()},
        "machine_busy": (busy1 - busy0) / max(1e-9, total1 - total0),
        # seconds after the last first flag until labeling had every image's task
        "labeling_behind_s": max(0.0, last_task(t) - max(flagged)),  # type: ignore[type-var,operator]
        "acked": len(acked),
        "refused": len(sent.refused),
        "send_seconds": sent.seconds,
        "wall_seconds": time.time() - started,
        "images_per_s": len(acked) / span,
        "cstore_images_per_s": len(acked) / sent.seconds,
        "accepted_to_first_flag_s": summary(e2e),
        "stages_s": stage_summaries(t),
        "rss_mb": {k: round((v or 0) / 2**20) for k, v in system.rss().items()},
    }


def phase_alone(system: SystemHarness, batch: Batch, associations: int) -> dict[str, dict[str, float]]:
    data = system.data_dir
    agg = data / "aggregator.db"
    # every consumer stops, labeling too: it renders each image it receives for annotators (CPU
    # the stages would otherwise share while "alone"); it is measured alone last
    for svc in ("inference", "aggregator", "labeling"):
        system.children[svc].terminate()
    labeling_db = data / "labeling.db"
    before_tasks = count(labeling_db, "SELECT count(*) FROM labeling_tasks")
    before_pred = count(agg, "SELECT count(*) FROM aggregator_predictions")
    before_received = count(agg, "SELECT count(*) FROM aggregator_images WHERE eligible IS NOT NULL")
    # ingest alone: C-STORE until the outbox has published everything
    t0, ingest_cpu0 = time.time(), cpu_seconds(system, "ingest")
    sent = system.send(batch.paths, associations=associations)
    acked = batch.acked_uids(sent)
    wait_until(
        lambda: count(data / "ingest.db", "SELECT count(*) FROM ingest_outbox WHERE published_at IS NULL") == 0,
        600,
        "ingest alone: draining its outbox ...",
    )
    ingest_s = time.time() - t0
    ingest_cpu = cpu_seconds(system, "ingest") - ingest_cpu0
    # inference alone against a full queue
    system.children["inference"].start()
    t1 = time.time()
    # how busy the machine is while inference works (from the first poll that sees its queue
    # shrink to the drained one): near 100 % means inference alone is bound by the two cores
    busy_at: list[tuple[float, float]] = []

    def inference_drained() -> bool:
        ready = queue_ready(system, "inference.images", "aggregator.events")
        drained = ready["inference.images"] == 0 and ready["aggregator.events"] >= len(acked) * 2
        if not busy_at and ready["inference.images"] < len(acked):
            busy_at.append(machine_cpu())
        if drained and busy_at:
            busy_at.append(machine_cpu())
        return drained

    wait_until(
        inference_drained,
        900,
        f"inference alone: draining {len(acked)} images ...",
    )
    system.children["inference"].wait_healthy(60)
    inference_wall = time.time() - t1
    # the aggregator alone against its full queue (image.received + prediction.made per image).
    # Its rate is taken from the first poll that sees it working (process start-up excluded) to
    # the poll that sees the last event applied, counting events from its DB; polled every 0.1 s.
    system.children["aggregator"].start()
    t2 = time.time()
    total_events = 2 * len(acked)

    def applied() -> int:
        preds = count(agg, "SELECT count(*) FROM aggregator_predictions") - before_pred
        received = count(agg, "SELECT count(*) FROM aggregator_images WHERE eligible IS NOT NULL") - before_received
        return preds + received

    first_seen: tuple[float, int] | None = None
    cpu0 = float("nan")
    with console.status("aggregator alone: draining its queue ..."):
        while True:
            now, done = time.time(), applied()
            if first_seen is None and done > 0:
                first_seen = (now, done)
                cpu0 = cpu_seconds(system, "aggregator")
            if done >= total_events:
                break
            if now - t2 > 900:
                raise TimeoutError("aggregator alone")
            time.sleep(0.1)
    aggregator_s = time.time() - t2
    aggregator_cpu = cpu_seconds(system, "aggregator") - cpu0
    assert first_seen is not None
    drain_s = max(1e-3, now - first_seen[0])
    aggregator_rate = (total_events - first_seen[1]) / drain_s / 2  # two events per image
    system.children["aggregator"].wait_healthy(60)
    labeling = labeling_alone(system, labeling_db, before_tasks)
    t = timeline(system, acked)
    predicted = sorted(v["predicted"] for v in t.values() if v.get("predicted"))  # type: ignore[type-var]
    # inference's own rate from its prediction timestamps (start-up excluded)
    inference_rate = (len(predicted) - 1) / (predicted[-1] - predicted[0]) if len(predicted) > 1 else float("nan")  # type: ignore[operator]
    return {
        "ingest": {
            "images_per_s": len(acked) / ingest_s,
            "seconds": ingest_s,
            "images_per_cpu_s": len(acked) / ingest_cpu if ingest_cpu > 0 else None,
        },
        "inference": {
            "images_per_s": inference_rate,
            "seconds_incl_startup": inference_wall,
            "machine_busy": (busy_at[-1][0] - busy_at[0][0]) / max(1e-9, busy_at[-1][1] - busy_at[0][1])
            if len(busy_at) == 2
            else None,
        },
        "aggregator": {
            "images_per_s": aggregator_rate,
            "events_per_s": aggregator_rate * 2,
            "seconds_incl_startup": aggregator_s,
            "images_per_s_incl_startup": len(acked) / aggregator_s,
            # contention-independent: images applied per second of the aggregator's own CPU time
            "images_per_cpu_s": (total_events - first_seen[1]) / 2 / aggregator_cpu if aggregator_cpu > 0 else None,
        },
        "labeling": labeling,
    }


def labeling_alone(system: SystemHarness, db: Path, before: int) -> dict[str, float]:
    """Labeling started alone against its full queue: tasks created per second, from the first poll
    that sees it working to the last new task (polled every 0.1 s). Labeling is off the model-only
    path to a first flag, so it is reported but not part of the ceiling."""
    system.children["labeling"].start()
    first: tuple[float, int] | None = None
    last: tuple[float, int] = (time.time(), before)
    cpu0 = float("nan")
    with console.status("labeling alone: draining its queue ..."):
        deadline = time.time() + 900
        while time.time() < deadline:
            now, done = time.time(), count(db, "SELECT count(*) FROM labeling_tasks")
            if first is None and done > before:
                first, cpu0 = (now, done), cpu_seconds(system, "labeling")
            if done > last[1]:
                last = (now, done)
            elif (
                first is not None
                and now - last[0] > 1.0
                and queue_ready(system, "labeling.images")["labeling.images"] == 0
            ):
                break
            time.sleep(0.1)
    system.children["labeling"].wait_healthy(60)
    if first is None or last[0] <= first[0]:
        return {"images_per_s": float("nan"), "images_per_cpu_s": float("nan")}
    cpu = cpu_seconds(system, "labeling") - cpu0
    made = last[1] - first[1]
    return {"images_per_s": made / (last[0] - first[0]), "images_per_cpu_s": made / cpu if cpu > 0 else float("nan")}


class _HeldCheckpoint(threading.Event):
    """Keeps a requestor association's reactor paused while we send.

    pynetdicom 3.0's requestor reactor can take a C-STORE response off the DIMSE queue between
    send_c_store's "is the reactor paused?" check and the reactor's own get_msg (a race in its
    pause protocol); the sender then waits its whole DIMSE timeout for a response that was already
    received. Seen here as 120 s stalls at high offered loads: py-spy showed the sender threads in
    send_c_store's get_msg, the SCP's threads idle, and both sockets' queues empty. Our sender needs
    no reactor (the SCP sends it no requests), so it stays paused until the release."""

    hold = True

    def set(self) -> None:
        if not self.hold:
            super().set()


def paced_send(system: SystemHarness, files: list[Path], rate: float, associations: int) -> dict[str, object]:
    """Offered load: image i is sent at t0 + i/rate, over `associations` associations opened up
    front (a study's images on one association; pynetdicom SCU, TCP_NODELAY, files streamed as
    they are on disk). A sender that falls behind sends at once: the lateness is reported."""
    import socket

    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config
    from pynetdicom.presentation import build_context

    _config.STORE_SEND_CHUNKED_DATASET = True
    chunks = chunk_by_study(files, associations)
    schedule: list[list[tuple[float, Path]]] = [[] for _ in chunks]
    position, i = [0] * len(chunks), 0
    while any(position[c] < len(chunks[c]) for c in range(len(chunks))):
        for c, chunk in enumerate(chunks):
            if position[c] < len(chunk):
                schedule[c].append((i / rate, chunk[position[c]]))
                position[c] += 1
                i += 1
    acked: list[Path] = []
    refused: list[tuple[Path, str]] = []
    lateness: list[float] = []
    lock = threading.Lock()
    associated = threading.Barrier(len(chunks) + 1)
    go = threading.Event()
    t0 = [0.0]

    def worker(items: list[tuple[float, Path]]) -> None:
        ae = AE(ae_title="BENCH_RATE")
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
        pairs = set()
        for _, path in items:
            meta = read_file_meta_info(path)
            pairs.add((str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID)))
        contexts = [build_context(sop, [ts]) for sop, ts in sorted(pairs)]
        assoc = ae.associate("127.0.0.1", system.dicom_port, contexts=contexts, ae_title=system.config.ae_title)
        raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        if raw is not None:
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        checkpoint = _HeldCheckpoint()
        assoc._reactor_checkpoint = checkpoint  # the reactor blocks on it at its next turn
        time.sleep(0.01)  # a bench, not a test: past any turn the reactor began with the old one
        while assoc.is_established and not assoc._is_paused:
            time.sleep(0.0001)
        associated.wait()
        go.wait()
        try:
            for offset, path in items:
                delay = t0[0] + offset - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                late = max(0.0, -delay)
                status = assoc.send_c_store(path) if assoc.is_established else None
                code = int(status.Status) if status is not None and "Status" in status else None
                with lock:
                    lateness.append(late)
                    if code == 0:
                        acked.append(path)
                    else:
                        refused.append((path, "no response" if code is None else f"0x{code:04X}"))
        finally:
            checkpoint.hold = False
            if assoc.is_established:
                assoc.release()
            checkpoint.set()  # let the reactor thread see the end

    threads = [threading.Thread(target=worker, args=(items,), daemon=True) for items in schedule]
    for thread in threads:
        thread.start()
    associated.wait()  # every association is open: the clock starts now
    t0[0] = time.monotonic() + 0.2
    go.set()
    for thread in threads:
        thread.join()
    seconds = time.monotonic() - t0[0]
    return {"acked": acked, "refused": refused, "seconds": seconds, "lateness": lateness}


def refusal_kinds(refused: list[tuple[Path, str]]) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for _, why in refused:
        kinds[why] = kinds.get(why, 0) + 1
    return kinds


def phase_rate(system: SystemHarness, batch: Batch, rate: float, associations: int) -> dict[str, object]:
    agg = system.data_dir / "aggregator.db"
    flagged_before = count(agg, "SELECT count(*) FROM aggregator_studies WHERE first_flag_at IS NOT NULL")
    loadavg = os.getloadavg()
    sent = paced_send(system, batch.paths, rate, associations)
    acked = batch.uids(sent["acked"])  # type: ignore[arg-type]
    studies = {m.study_instance_uid for m in batch.images if m.sop_instance_uid in acked}
    wait_until(
        lambda: (
            count(agg, "SELECT count(*) FROM aggregator_studies WHERE first_flag_at IS NOT NULL")
            >= flagged_before + len(studies)
        ),
        900,
        f"{rate:.1f} images/s: waiting for {len(studies)} studies to get their first flag ...",
    )
    wait_for_labeling(system, acked, f"{rate:.1f} images/s: labeling catching up ...")
    t = timeline(system, acked)
    per_study: dict[str, list[float]] = {}
    first_flag: dict[str, float] = {}
    for v in t.values():
        if v.get("accepted") and v.get("first_flag"):
            per_study.setdefault(str(v["study"]), []).append(v["accepted"])  # type: ignore[arg-type]
            first_flag[str(v["study"])] = v["first_flag"]  # type: ignore[assignment]
    e2e = [first_flag[s] - min(acc) for s, acc in per_study.items()]
    accepted = sorted(v["accepted"] for v in t.values() if v.get("accepted"))  # type: ignore[type-var]
    achieved = (len(accepted) - 1) / (accepted[-1] - accepted[0]) if len(accepted) > 1 else float("nan")  # type: ignore[operator]
    return {
        "offered_images_per_s": rate,
        "achieved_images_per_s": achieved,
        "images": len(batch.images),
        "acked": len(acked),
        "refused": len(sent["refused"]),  # type: ignore[arg-type]
        "refused_by_status": refusal_kinds(sent["refused"]),  # type: ignore[arg-type]
        "studies": len(studies),
        "sender_late_s": summary(sent["lateness"]),  # type: ignore[arg-type]
        "accepted_to_first_flag_s": summary(e2e),
        "stages_s": stage_summaries(t),
        # labeling's last task of this level, seconds after the level's last C-STORE was accepted
        "labeling_done_after_last_accepted_s": last_task(t) - accepted[-1],  # type: ignore[operator]
        "loadavg_1m": loadavg[0],
    }


def report(result: dict[str, object]) -> None:
    la, lb = result["loadavg_before"], result["loadavg_after"]  # type: ignore[misc]
    console.print(
        f"{result['cpus']} CPUs; load average (1/5/15 min) before {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}, "  # type: ignore[index]
        f"after {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}"  # type: ignore[index]
    )
    pipe = result.get("pipeline")
    if pipe is not None:
        table = Table(title=f"C-STORE accepted -> first flag, model only ({pipe['acked']} images, "  # type: ignore[index]
                      f"{result['associations']} associations, {result['cpus']} CPUs)")  # fmt: skip
        table.add_column("stage")
        for col in ("p50 s", "p95 s", "p99 s", "mean s"):
            table.add_column(col, justify="right")
        e2e = pipe["accepted_to_first_flag_s"]  # type: ignore[index]
        for name, s in [*pipe["stages_s"].items(), ("end to end (study)", e2e)]:  # type: ignore[index]
            table.add_row(name, *(f"{s[k]:.3f}" for k in ("p50", "p95", "p99", "mean")))
        console.print(table)
    if "alone" in result:
        alone = Table(title="each stage alone (same run)")
        alone.add_column("stage")
        alone.add_column("images/s", justify="right")
        alone.add_column("images per CPU-second of the service", justify="right")
        for name, s in result["alone"].items():  # type: ignore[attr-defined]
            per_cpu = s.get("images_per_cpu_s")
            label = f"{name} (off the first-flag path)" if name == "labeling" else name
            alone.add_row(label, f"{s['images_per_s']:.1f}", "-" if per_cpu is None else f"{per_cpu:.0f}")
        if pipe is not None:
            alone.add_row("[bold]pipeline (sustained)", f"[bold]{pipe['images_per_s']:.1f}", "")  # type: ignore[index]
        console.print(alone)
        busy = result["alone"]["inference"].get("machine_busy")  # type: ignore[index]
        if busy is not None:
            console.print(f"machine busy while inference ran alone: {100 * busy:.0f} % (100 %: bound by the cores)")
        console.print(f"slowest stage alone: [bold]{result['ceiling_stage']}[/bold] "
                      f"({result['ceiling_images_per_s']:.1f} images/s) = the ceiling")  # fmt: skip
        if pipe is not None:
            console.print(
                f"pipeline {pipe['images_per_s']:.1f} images/s / ceiling ({result['ceiling_stage']} alone) "  # type: ignore[index]
                f"{result['ceiling_images_per_s']:.1f} images/s = {result['pipeline_over_ceiling']:.2f} "
                "(shown only: the 0.85 target is retired, issue 24)"
            )
            console.print(f"RSS after the pipeline phase (MB): {pipe['rss_mb']}")  # type: ignore[index]
            per_image = pipe["cpu_ms_per_image"]  # type: ignore[index]
            console.print(
                "during the burst: CPU ms per image "
                + ", ".join(f"{k} {v:.1f}" for k, v in per_image.items())  # type: ignore[union-attr]
                + f" (sum {sum(per_image.values()):.1f}); machine busy {100 * pipe['machine_busy']:.0f} %"  # type: ignore[union-attr,index]
            )
            # What the services' CPU alone allows on this machine when every stage shares its cores
            # (RabbitMQ's and the sender's CPU not counted): the bound the pipeline meets here, where
            # "slowest stage alone" assumes a stage has the cores to itself.
            cpu_bound = 1000 * int(result["cpus"]) / max(1e-9, sum(per_image.values()))  # type: ignore[union-attr,arg-type]
            result["cpu_bound_images_per_s"] = cpu_bound
            efficiency = pipe["images_per_s"] / cpu_bound  # type: ignore[index]
            result["pipeline_efficiency"] = efficiency
            console.print(
                f"shared-CPU bound: {result['cpus']} CPUs / {sum(per_image.values()):.1f} ms per image = "  # type: ignore[union-attr]
                f"{cpu_bound:.1f} images/s; [bold]pipeline efficiency[/bold] = pipeline / that = "
                f"[bold]{efficiency:.2f}[/bold] (target >= 0.9: {'met' if efficiency >= 0.9 else 'NOT met'})"
            )
            # labeling yields its CPU to the flag path (PT_LABELING_CPU_NICE) and catches up later
            flag_ms = sum(v for k, v in per_image.items() if k != "labeling")  # type: ignore[union-attr]
            flag_bound = 1000 * int(result["cpus"]) / max(1e-9, flag_ms)  # type: ignore[arg-type]
            result["flag_path_cpu_bound_images_per_s"] = flag_bound
            console.print(
                f"flag path only (labeling deferred): {result['cpus']} CPUs / {flag_ms:.1f} ms = {flag_bound:.1f} "
                f"images/s; pipeline / that = {pipe['images_per_s'] / flag_bound:.2f}; labeling had every task "  # type: ignore[index]
                f"{pipe['labeling_behind_s']:.1f} s after the last first flag"  # type: ignore[index]
            )
    single = result.get("single")
    if single is not None:
        s1 = single["accepted_to_first_flag_s"]  # type: ignore[index]
        verdict = "met" if s1["p95"] <= 0.5 else "not met"
        console.print(
            f"one study at a time ({single['flagged']}/{single['studies']} single-image studies, load 1m "  # type: ignore[index]
            f"{single['loadavg_1m']:.1f}): C-STORE accepted -> first flag p50 {s1['p50']:.3f} / [bold]p95 "  # type: ignore[index]
            f"{s1['p95']:.3f}[/bold] / max {s1['max']:.3f} s (SLO p95 <= 0.5 s: {verdict})"
        )
    levels = result.get("offered_load") or []
    if levels:
        basis = str(result.get("capacity_basis", "pipeline"))
        cap = result.get("capacity_images_per_s")
        console.print(
            f"capacity = {basis}" + (f": {float(cap):.1f} images/s" if cap is not None else "")  # type: ignore[arg-type]
        )
        title = (
            "offered load: C-STORE accepted -> study's first flag (SLO: p95 <= 1 s at 50 % of the pipeline's capacity)"
        )
        curve = Table(title=title)
        for col in ("% of capacity", "offered img/s", "achieved img/s", "images", "p50 s", "p95 s", "p99 s", "max s",
                    "p95 ingest / inference / agg. queue s", "labeling task p95 s / done +s", "sender late p95 s",
                    "load 1m"):  # fmt: skip
            curve.add_column(col, justify="right")
        for lv in levels:  # type: ignore[attr-defined]
            lat = lv["accepted_to_first_flag_s"]
            frac = lv.get("fraction_of_capacity")
            curve.add_row(
                "-" if frac is None else f"{100 * frac:.0f} %",
                f"{lv['offered_images_per_s']:.1f}",
                f"{lv['achieved_images_per_s']:.1f}",
                f"{lv['acked']}/{lv['images']}",
                *(f"{lat[k]:.3f}" for k in ("p50", "p95", "p99")),
                f"{lat['max']:.3f}",
                " / ".join(f"{st['p95']:.2f}" for st in list(lv["stages_s"].values())[:3]),
                f"{lv['stages_s'][LABELING_STAGE]['p95']:.2f} / {lv['labeling_done_after_last_accepted_s']:.1f}",
                f"{lv['sender_late_s']['p95']:.3f}",
                f"{lv['loadavg_1m']:.1f}",
            )
        console.print(curve)
        half = [lv for lv in levels if abs(float(lv.get("fraction_of_capacity", 0)) - 0.5) < 0.01]  # type: ignore[union-attr,arg-type]
        if half:
            p95 = half[0]["accepted_to_first_flag_s"]["p95"]  # type: ignore[index]
            console.print(
                f"SLO at 50 % of the pipeline's capacity ({half[0]['offered_images_per_s']:.1f} images/s): "  # type: ignore[index]
                f"[bold]p95 {p95:.3f} s[/bold] (<= 1 s: {'met' if p95 <= 1.0 else 'not met'})"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="images through the whole pipeline")
    parser.add_argument("--associations", type=int, default=4, help="concurrent storescu associations")
    parser.add_argument("--alone", type=int, default=300, help="images for the stage-alone measurements")
    parser.add_argument(
        "--curve",
        type=float,
        nargs="*",
        default=[0.25, 0.5, 0.75, 0.9],
        help="offered-load levels as fractions of the pipeline's capacity measured in the same run (empty: none)",
    )
    parser.add_argument(
        "--single", type=int, default=10, help="single-image studies sent one at a time (SLO p95 <= 0.5 s; 0: none)"
    )
    parser.add_argument(
        "--rate", type=float, nargs="*", default=[], help="offered load(s) in images/s; alone: skip phases 1-2"
    )
    parser.add_argument("--rate-seconds", type=float, default=20.0, help="how long each offered-load level lasts")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the run's files (logs, DBs) here")
    parser.add_argument("--ingest-workers", type=int, default=1, help="PT_INGEST_WORKERS for the ingest service")
    args = parser.parse_args()
    os.environ["PT_INGEST_WORKERS"] = str(args.ingest_workers)  # the services inherit the environment
    print(f"ingest: PT_INGEST_WORKERS={args.ingest_workers}")
    n, alone, curve = args.n, args.alone, args.curve
    if args.rate and "--n" not in sys.argv and "--alone" not in sys.argv:
        n, alone, curve = 0, 0, []  # `--rate R` alone: just that offered load
        single = args.single if "--single" in sys.argv else 0
    else:
        single = args.single
    with tempfile.TemporaryDirectory(prefix="pt-bench-e2e-") as tmp:
        workdir = args.workdir or Path(tmp)
        result = run(n, args.associations, alone, workdir, curve, args.rate, args.rate_seconds, single)
    report(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
