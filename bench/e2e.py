"""End-to-end benchmark: sustained images/s and C-STORE accepted -> first flag latency (model only),
with a per-stage breakdown, and each stage measured alone in the same run (the pipeline's ceiling).

    python bench/e2e.py --n 400 --associations 4 --alone 300 [--json-out result.json]

Phase 1 (pipeline): the whole system (RabbitMQ, ingest, inference, labeling, aggregator as
processes, SQLite, embedded onnxruntime) receives N real chest X-rays over dcmtk storescu.
Per image, timestamps from the services' own databases give the stages:
  ingest      C-STORE accepted (DB commit)        -> image.received confirmed by the broker (outbox)
  inference   image.received published            -> prediction made (model + heatmap)
  aggregator queue  prediction made               -> stored by the aggregator (waiting in aggregator.events)
  aggregator  stored                              -> study's first flag
Phase 2 (alone): the consumers are stopped, M more images are sent (ingest alone: C-STORE
throughput), then inference is started alone against the full queue (its drain rate), then the
aggregator alone against its full queue. ceiling = the slowest stage alone; pipeline/ceiling says
how much of it the running system keeps.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import sys
import tempfile
import time
from contextlib import closing
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from services.system.rabbitmq import RabbitNode  # noqa: E402
from tests.support.system_harness import SystemHarness  # noqa: E402
from tests.support.system_scenario import Batch, make_batch  # noqa: E402

console = Console()
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
    }


def timeline(system: SystemHarness, uids: set[str]) -> dict[str, dict[str, float | None]]:
    """Per SOP instance: accepted, published, predicted, stored, first_flag (epoch seconds)."""
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


def count(db: Path, sql: str) -> int:
    try:
        return int(rows(db, sql)[0][0])
    except sqlite3.OperationalError:
        return 0


def run(n: int, associations: int, alone: int, workdir: Path) -> dict[str, object]:
    result: dict[str, object] = {"n": n, "associations": associations, "alone_n": alone, "cpus": os.cpu_count()}
    with console.status("making DICOM from the shared X-rays ..."):
        batch = make_batch(SHARED, workdir / "pipeline", n, seed=101)
        batch2 = make_batch(SHARED, workdir / "alone", alone, seed=202)
    with RabbitNode() as rabbit:
        system = SystemHarness(rabbit, workdir / "system", env={"PT_LOG_LEVEL": "WARNING"}).start()
        try:
            result["pipeline"] = phase_pipeline(system, batch, associations)
            result["alone"] = phase_alone(system, batch2, associations)
        finally:
            system.stop()
    pipe = result["pipeline"]["images_per_s"]  # type: ignore[index]
    stages = result["alone"]  # type: ignore[assignment]
    slowest = min(stages, key=lambda k: stages[k]["images_per_s"])  # type: ignore[index]
    result["ceiling_stage"] = slowest
    result["ceiling_images_per_s"] = stages[slowest]["images_per_s"]  # type: ignore[index]
    result["pipeline_over_ceiling"] = pipe / stages[slowest]["images_per_s"]  # type: ignore[index]
    return result


def phase_pipeline(system: SystemHarness, batch: Batch, associations: int) -> dict[str, object]:
    agg = system.data_dir / "aggregator.db"
    started = time.time()
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

    def stage(a: str, b: str) -> list[float]:
        return [v[b] - v[a] for v in t.values() if v.get(a) and v.get(b)]  # type: ignore[operator]

    span = max(flagged) - min(accepted)  # type: ignore[type-var,operator]
    return {
        "acked": len(acked),
        "refused": len(sent.refused),
        "send_seconds": sent.seconds,
        "wall_seconds": time.time() - started,
        "images_per_s": len(acked) / span,
        "cstore_images_per_s": len(acked) / sent.seconds,
        "accepted_to_first_flag_s": summary(e2e),
        "stages_s": {
            "ingest (accepted -> published)": summary(stage("accepted", "published")),
            "inference (published -> predicted)": summary(stage("published", "predicted")),
            "aggregator queue (predicted -> stored)": summary(stage("predicted", "stored")),
            "aggregator (stored -> first flag)": summary(
                [max(0.0, v["first_flag"] - v["stored"]) for v in t.values() if v.get("stored") and v.get("first_flag")]  # type: ignore[operator]
            ),
        },
        "rss_mb": {k: round((v or 0) / 2**20) for k, v in system.rss().items()},
    }


def phase_alone(system: SystemHarness, batch: Batch, associations: int) -> dict[str, dict[str, float]]:
    data = system.data_dir
    agg = data / "aggregator.db"
    for svc in ("inference", "aggregator"):
        system.children[svc].terminate()
    before_pred = count(agg, "SELECT count(*) FROM aggregator_predictions")
    # ingest alone: C-STORE until the outbox has published everything
    t0 = time.time()
    sent = system.send(batch.paths, associations=associations)
    acked = batch.acked_uids(sent)
    wait_until(
        lambda: count(data / "ingest.db", "SELECT count(*) FROM ingest_outbox WHERE published_at IS NULL") == 0,
        600,
        "ingest alone: draining its outbox ...",
    )
    ingest_s = time.time() - t0
    # inference alone against a full queue
    system.children["inference"].start()
    t1 = time.time()
    wait_until(
        lambda: (
            system.queue_depths().get("inference.images", 1) == 0
            and system.queue_depths().get("aggregator.events", 0) >= len(acked) * 2
        ),
        900,
        f"inference alone: draining {len(acked)} images ...",
    )
    system.children["inference"].wait_healthy(60)
    inference_wall = time.time() - t1
    # the aggregator alone against its full queue (image.received + prediction.made per image)
    system.children["aggregator"].start()
    t2 = time.time()
    wait_until(
        lambda: (
            count(agg, "SELECT count(*) FROM aggregator_predictions") >= before_pred + len(acked)
            and system.queue_depths().get("aggregator.events", 1) == 0
        ),
        900,
        "aggregator alone: draining its queue ...",
    )
    aggregator_s = time.time() - t2
    system.children["aggregator"].wait_healthy(60)
    t = timeline(system, acked)
    predicted = sorted(v["predicted"] for v in t.values() if v.get("predicted"))  # type: ignore[type-var]
    # inference's own rate from its prediction timestamps (start-up excluded)
    inference_rate = (len(predicted) - 1) / (predicted[-1] - predicted[0]) if len(predicted) > 1 else float("nan")  # type: ignore[operator]
    return {
        "ingest": {"images_per_s": len(acked) / ingest_s, "seconds": ingest_s},
        "inference": {"images_per_s": inference_rate, "seconds_incl_startup": inference_wall},
        "aggregator": {"images_per_s": len(acked) / aggregator_s, "seconds_incl_startup": aggregator_s},
    }


def report(result: dict[str, object]) -> None:
    pipe = result["pipeline"]  # type: ignore[assignment]
    table = Table(title=f"C-STORE accepted -> first flag, model only ({pipe['acked']} images, "  # type: ignore[index]
                  f"{result['associations']} associations, {result['cpus']} CPUs)")  # fmt: skip
    table.add_column("stage")
    for col in ("p50 s", "p95 s", "p99 s", "mean s"):
        table.add_column(col, justify="right")
    e2e = pipe["accepted_to_first_flag_s"]  # type: ignore[index]
    for name, s in [*pipe["stages_s"].items(), ("end to end (study)", e2e)]:  # type: ignore[index]
        table.add_row(name, *(f"{s[k]:.3f}" for k in ("p50", "p95", "p99", "mean")))
    console.print(table)
    alone = Table(title="each stage alone (same run)")
    alone.add_column("stage")
    alone.add_column("images/s", justify="right")
    for name, s in result["alone"].items():  # type: ignore[attr-defined]
        alone.add_row(name, f"{s['images_per_s']:.1f}")
    alone.add_row("[bold]pipeline (sustained)", f"[bold]{pipe['images_per_s']:.1f}")  # type: ignore[index]
    console.print(alone)
    console.print(
        f"pipeline {pipe['images_per_s']:.1f} images/s / ceiling ({result['ceiling_stage']} alone) "  # type: ignore[index]
        f"{result['ceiling_images_per_s']:.1f} images/s = [bold]{result['pipeline_over_ceiling']:.2f}[/bold]"
    )
    console.print(f"RSS after the pipeline phase (MB): {pipe['rss_mb']}")  # type: ignore[index]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="images through the whole pipeline")
    parser.add_argument("--associations", type=int, default=4, help="concurrent storescu associations")
    parser.add_argument("--alone", type=int, default=300, help="images for the stage-alone measurements")
    parser.add_argument("--json-out", type=Path, default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pt-bench-e2e-") as tmp:
        result = run(args.n, args.associations, args.alone, Path(tmp))
    report(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
