"""Backlog benchmark (issue 24): does a catch-up delay a new patient's flag?

    python bench/backlog.py --n 3000 --associations 4 --fresh-rate 0.5 [--modes lanes off] [--json-out r.json]

Per mode, on its own system (a throwaway RabbitMQ node shared by the modes; the four services as
processes, as bench/e2e.py starts them):
1. **Capacity**: a burst of --capacity-n images sent as fast as --associations allow, measured as
   bench/e2e.py's phase 1 does (images / (last first flag - first accepted)): the pipeline's
   capacity in this mode, in this run.
2. **Catch-up**: a backlog of --n images (real chest X-rays as DX, dated --backlog-age-days ago, as
   a PACS back after an outage or a site back-loading last month re-sends them) sent as fast as
   --associations storescu associations allow, and at the same time fresh single-image studies
   (dated today) at --fresh-rate per second over one more association (pynetdicom; --fresh-high:
   C-STORE Priority HIGH too), until the backlog is drained (every backlog image predicted and
   every backlog study flagged). Then the fresh studies still in flight are waited for.
Reported per mode: fresh studies' C-STORE accepted -> first flag p50/p95/max (the aim: p95 <= 2 s
during the catch-up), the backlog's drain time (first backlog image accepted -> the last backlog
study's first flag / prediction) and rate as a share of the capacity, nothing lost (every
acknowledged image predicted, every study flagged), no duplicates (an image predicted twice by one
model, a study's history with the same event applied twice), the lanes the aggregator recorded,
and the machine's load average. Mode "lanes": PT_INGEST_LANES=true (the default; old images go to
the backfill lane); mode "off": PT_INGEST_LANES=false (every image fresh, first-in first-out: the
peer, in the same run).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import pydicom  # noqa: E402
from e2e import SHARED, _HeldCheckpoint, console, phase_pipeline, rows, summary, ts  # noqa: E402
from pydicom.uid import generate_uid  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn  # noqa: E402
from rich.table import Table  # noqa: E402

from harness.rabbitmq import RabbitNode  # noqa: E402
from harness.system_dicom import MadeImage, make_dx, pick_xrays  # noqa: E402
from harness.system_harness import SystemHarness  # noqa: E402
from harness.system_scenario import Batch, make_batch  # noqa: E402

MODES = {"lanes": "true", "off": "false"}


def make_backlog(workdir: Path, n: int, age_days: int) -> Batch:
    """n images (a third of the studies with two), their study dated age_days ago."""
    batch = make_batch(SHARED, workdir / "backlog", n, seed=404)
    old = (datetime.now(UTC) - timedelta(days=age_days)).strftime("%Y%m%d")
    for m in batch.images:
        ds = pydicom.dcmread(m.path)
        ds.StudyDate = old
        ds.save_as(m.path, enforce_file_format=True)
    return batch


def make_fresh(workdir: Path, n: int) -> list[MadeImage]:
    """n single-image studies dated today (make_dx's default)."""
    return [
        make_dx(src, workdir / "fresh" / f"fresh{i:04d}.dcm", 900000 + i, generate_uid(), generate_uid(), 1)
        for i, (src, _label) in enumerate(pick_xrays(SHARED, n, seed=505))
    ]


def fresh_sender(
    system: SystemHarness, files: list[Path], rate: float, stop: threading.Event, high: bool, out: list[dict]
) -> None:
    """One association; study k sent at t0 + k/rate until `stop` is set or the files run out."""
    import socket

    from pydicom.filereader import read_file_meta_info
    from pynetdicom import AE, _config
    from pynetdicom.presentation import build_context

    _config.STORE_SEND_CHUNKED_DATASET = True
    meta = read_file_meta_info(files[0])
    ae = AE(ae_title="BENCH_FRESH")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 120
    contexts = [build_context(str(meta.MediaStorageSOPClassUID), [str(meta.TransferSyntaxUID)])]
    assoc = ae.associate("127.0.0.1", system.dicom_port, contexts=contexts, ae_title=system.config.ae_title)
    raw = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if raw is not None:
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    checkpoint = _HeldCheckpoint()  # see bench/e2e.py: pynetdicom's requestor pause race
    assoc._reactor_checkpoint = checkpoint
    time.sleep(0.01)
    while assoc.is_established and not assoc._is_paused:
        time.sleep(0.0001)
    t0 = time.monotonic()
    try:
        for k, path in enumerate(files):
            delay = t0 + k / rate - time.monotonic()
            if stop.wait(max(0.0, delay)):
                break
            if not assoc.is_established:
                out.append({"path": path, "status": None})
                continue
            status = assoc.send_c_store(path, priority=1 if high else 0)
            code = int(status.Status) if status is not None and "Status" in status else None
            out.append({"path": path, "status": code})
    finally:
        checkpoint.hold = False
        if assoc.is_established:
            assoc.release()
        checkpoint.set()


class Poll:
    """Incremental reads of the services' databases (new rows only, by rowid)."""

    def __init__(self, data: Path) -> None:
        self.data = data
        self.accepted: dict[str, float] = {}
        self.predicted: dict[str, int] = {}
        self.stored: dict[str, float] = {}
        self.flagged: dict[str, float] = {}
        self._ingest_id = self._pred_id = 0

    def update(self) -> None:
        try:
            for rid, sop, received in rows(
                self.data / "ingest.db",
                f"SELECT id, sop_instance_uid, received_at FROM ingest_instances WHERE id > {self._ingest_id}",
            ):
                self._ingest_id = max(self._ingest_id, rid)
                self.accepted[sop] = ts(received)  # type: ignore[assignment]
            agg = self.data / "aggregator.db"
            for rid, sop, stored in rows(
                agg, f"SELECT id, sop_uid, stored_at FROM aggregator_predictions WHERE id > {self._pred_id}"
            ):
                self._pred_id = max(self._pred_id, rid)
                self.predicted[sop] = self.predicted.get(sop, 0) + 1
                self.stored[sop] = ts(stored)  # type: ignore[assignment]
            self.flagged = {
                study: ts(at)  # type: ignore[misc]
                for study, at in rows(
                    agg, "SELECT study_uid, first_flag_at FROM aggregator_studies WHERE first_flag_at IS NOT NULL"
                )
            }
        except sqlite3.OperationalError:
            pass  # a database not created yet, or busy: next poll


def catch_up(
    system: SystemHarness,
    backlog: Batch,
    fresh: list[MadeImage],
    associations: int,
    rate: float,
    high: bool,
    mode: str,
    timeout: float,
) -> dict[str, object]:
    poll = Poll(system.data_dir)
    by_path = {m.path: m for m in backlog.images}
    fresh_by_path = {m.path: m for m in fresh}
    backlog_sops = {m.sop_instance_uid for m in backlog.images}
    stop = threading.Event()
    fresh_out: list[dict] = []
    sent: dict[str, object] = {}
    backlog_thread = threading.Thread(
        target=lambda: sent.update(result=system.send(backlog.paths, associations=associations, timeout=timeout)),
        daemon=True,
    )
    fresh_thread = threading.Thread(
        target=fresh_sender, args=(system, [m.path for m in fresh], rate, stop, high, fresh_out), daemon=True
    )
    load_before = os.getloadavg()
    started = time.monotonic()
    backlog_thread.start()
    fresh_thread.start()
    drained_at: float | None = None
    with Progress(
        TextColumn(f"[bold]{mode}[/bold] {{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("{task.fields[note]}"),
        console=console,
        transient=False,
    ) as progress:
        t_acc = progress.add_task("backlog accepted ", total=len(backlog_sops), note="")
        t_pred = progress.add_task("backlog predicted", total=len(backlog_sops), note="")
        t_fresh = progress.add_task("fresh flagged    ", total=None, note="")
        while True:
            time.sleep(0.5)
            poll.update()
            acc = sum(1 for s in backlog_sops if s in poll.accepted)
            pred = sum(1 for s in backlog_sops if s in poll.predicted)
            lat = fresh_latencies(poll, fresh_by_path, fresh_out)
            progress.update(t_acc, completed=acc)
            progress.update(t_pred, completed=pred)
            note = f"last {lat[-1]:.2f} s, max {max(lat):.2f} s" if lat else ""
            progress.update(t_fresh, completed=len(lat), total=max(1, len(fresh_out)), note=note)
            if not backlog_thread.is_alive() and "result" not in sent:
                stop.set()
                raise RuntimeError(f"{mode}: the backlog's storescu senders failed (see the traceback above)")
            if not backlog_thread.is_alive() and drained_at is None:
                acked = {by_path[p].sop_instance_uid for p in sent["result"].acked}  # type: ignore[attr-defined]
                studies = {by_path[p].study_instance_uid for p in sent["result"].acked}  # type: ignore[attr-defined]
                if acked <= poll.predicted.keys() and studies <= poll.flagged.keys():
                    drained_at = time.monotonic()
                    stop.set()
            if drained_at is not None and not fresh_thread.is_alive():
                fresh_acked = [r for r in fresh_out if r["status"] == 0]
                if all(fresh_by_path[r["path"]].study_instance_uid in poll.flagged for r in fresh_acked):
                    break
                if time.monotonic() - drained_at > 120:
                    break  # counted as lost below
            if time.monotonic() - started > timeout:
                stop.set()
                raise TimeoutError(f"{mode}: backlog not drained in {timeout:.0f} s")
    fresh_thread.join(30)
    load_after = os.getloadavg()
    poll.update()
    result = sent["result"]
    acked_paths = list(result.acked)  # type: ignore[attr-defined]
    acked = {by_path[p].sop_instance_uid for p in acked_paths}
    studies = {by_path[p].study_instance_uid for p in acked_paths}
    fresh_acked = [fresh_by_path[r["path"]] for r in fresh_out if r["status"] == 0]
    backlog_start = min(poll.accepted[s] for s in acked)
    backlog_end = max(max(poll.stored[s] for s in acked), max(poll.flagged[st] for st in studies))
    drain_s = backlog_end - backlog_start
    lat = fresh_latencies(poll, fresh_by_path, fresh_out)
    # fresh studies accepted while backlog images were still waiting for their prediction
    during = [
        poll.flagged[m.study_instance_uid] - poll.accepted[m.sop_instance_uid]
        for m in fresh_acked
        if m.sop_instance_uid in poll.accepted
        and m.study_instance_uid in poll.flagged
        and poll.accepted[m.sop_instance_uid] < max(poll.stored[s] for s in acked)
    ]
    agg = system.data_dir / "aggregator.db"
    fresh_studies = {m.study_instance_uid for m in fresh_acked}
    lanes: dict[str, int] = {}  # the lanes the aggregator recorded for the backlog's studies
    fresh_lanes: dict[str, int] = {}
    for study, lane in rows(agg, "SELECT study_uid, lane FROM aggregator_studies"):
        if study in fresh_studies:
            fresh_lanes[lane] = fresh_lanes.get(lane, 0) + 1
        elif study in studies:
            lanes[lane] = lanes.get(lane, 0) + 1
    dup_history = rows(
        agg,
        "SELECT count(*) FROM (SELECT study_uid, trigger FROM aggregator_triage_history "
        "WHERE trigger != '' GROUP BY study_uid, trigger HAVING count(*) > 1)",
    )[0][0]
    dup_pred = rows(
        agg,
        "SELECT count(*) FROM (SELECT sop_uid FROM aggregator_predictions "
        "GROUP BY sop_uid, model_name, model_version HAVING count(*) > 1)",
    )[0][0]
    all_acked = acked | {m.sop_instance_uid for m in fresh_acked}
    all_studies = studies | fresh_studies
    return {
        "mode": mode,
        "backlog_images": len(backlog.images),
        "backlog_acked": len(acked),
        "backlog_refused": len(result.refused),  # type: ignore[attr-defined]
        "backlog_send_s": result.seconds,  # type: ignore[attr-defined]
        "drain_s": drain_s,
        "drain_images_per_s": len(acked) / drain_s,
        "fresh_sent": len(fresh_out),
        "fresh_acked": len(fresh_acked),
        "fresh_accepted_to_first_flag_s": summary(lat),
        "fresh_during_backlog_s": summary(during),
        "lost_images": len(all_acked - poll.predicted.keys()),
        "unflagged_studies": len(all_studies - poll.flagged.keys()),
        "duplicate_predictions": int(dup_pred),
        "duplicate_history_events": int(dup_history),
        "study_lanes": lanes,
        "fresh_study_lanes": fresh_lanes,
        "loadavg_before": load_before,
        "loadavg_after": load_after,
    }


def fresh_latencies(poll: Poll, fresh_by_path: dict[Path, MadeImage], fresh_out: list[dict]) -> list[float]:
    out = []
    for r in list(fresh_out):
        m = fresh_by_path[r["path"]]
        if r["status"] == 0 and m.sop_instance_uid in poll.accepted and m.study_instance_uid in poll.flagged:
            out.append(poll.flagged[m.study_instance_uid] - poll.accepted[m.sop_instance_uid])
    return out


def run(args: argparse.Namespace, workdir: Path) -> dict[str, object]:
    result: dict[str, object] = {
        "n": args.n,
        "associations": args.associations,
        "fresh_rate": args.fresh_rate,
        "cpus": os.cpu_count(),
        "loadavg_before": os.getloadavg(),
        "modes": [],
    }
    with console.status(f"making {args.n} backlog images (dated {args.backlog_age_days} days ago) ..."):
        backlog = make_backlog(workdir, args.n, args.backlog_age_days)
    # enough fresh studies for a drain at 15 images/s (the sender stops when the backlog is drained)
    n_fresh = args.fresh_max or int(args.fresh_rate * args.n / 15) + 10
    with console.status(f"making {n_fresh} fresh single-image studies and {args.capacity_n} for capacity ..."):
        fresh = make_fresh(workdir, n_fresh)
        capacity_batch = make_batch(SHARED, workdir / "capacity", args.capacity_n, seed=606)
    with RabbitNode() as rabbit:
        for mode in args.modes:
            env = {"PT_LOG_LEVEL": "WARNING", "PT_INGEST_LANES": MODES[mode]}
            system = SystemHarness(rabbit, workdir / f"system-{mode}", env=env).start()
            try:
                console.print(f"{mode}: capacity burst of {args.capacity_n} images ...")
                cap = phase_pipeline(system, capacity_batch, args.associations)
                per_image = cap["cpu_ms_per_image"]  # type: ignore[index]
                cpu_bound = 1000 * int(result["cpus"]) / max(1e-9, sum(per_image.values()))  # type: ignore[union-attr,arg-type]
                console.print(
                    f"{mode}: capacity {cap['images_per_s']:.1f} images/s (shared-CPU bound {cpu_bound:.1f}); "
                    f"load average {os.getloadavg()[0]:.2f}"
                )
                res = catch_up(
                    system, backlog, fresh, args.associations, args.fresh_rate, args.fresh_high, mode, args.timeout
                )
                res["capacity_images_per_s"] = cap["images_per_s"]
                res["capacity_cpu_bound_images_per_s"] = cpu_bound
                res["capacity_p95_s"] = cap["accepted_to_first_flag_s"]["p95"]  # type: ignore[index]
                res["drain_share_of_capacity"] = res["drain_images_per_s"] / cap["images_per_s"]  # type: ignore[operator]
                result["modes"].append(res)  # type: ignore[attr-defined]
                report_mode(res)
            finally:
                system.stop()
    result["loadavg_after"] = os.getloadavg()
    return result


def report_mode(r: dict[str, object]) -> None:
    f = r["fresh_accepted_to_first_flag_s"]
    console.print(
        f"{r['mode']}: backlog {r['backlog_acked']}/{r['backlog_images']} drained in {r['drain_s']:.1f} s "
        f"({r['drain_images_per_s']:.1f} images/s = {r['drain_share_of_capacity']:.2f} of capacity); fresh "
        f"{f['n']} studies p50 {f['p50']:.2f} / p95 {f['p95']:.2f} / max {f['max']:.2f} s; lanes recorded: backlog "
        f"studies {r['study_lanes']}, fresh {r['fresh_study_lanes']}; lost {r['lost_images']}, unflagged "
        f"{r['unflagged_studies']}, duplicates {r['duplicate_predictions']} + {r['duplicate_history_events']}"
    )


def report(result: dict[str, object]) -> None:
    la, lb = result["loadavg_before"], result["loadavg_after"]  # type: ignore[misc]
    console.print(
        f"{result['cpus']} CPUs; load average (1/5/15 min) before {la[0]:.2f}/{la[1]:.2f}/{la[2]:.2f}, "  # type: ignore[index]
        f"after {lb[0]:.2f}/{lb[1]:.2f}/{lb[2]:.2f}"  # type: ignore[index]
    )
    table = Table(
        title=f"backlog of {result['n']} images over {result['associations']} associations + fresh studies at "
        f"{result['fresh_rate']}/s (aim: fresh p95 <= 2 s during the catch-up)"
    )
    columns = ["lanes", "capacity img/s", "drain s", "drain img/s", "of capacity", "fresh n"]
    columns += ["fresh p50 s", "p95 s", "max s", "lost/unflagged", "dup.", "backlog studies' lane", "load 1m"]
    for col in columns:
        table.add_column(col, justify="right")
    for r in result["modes"]:  # type: ignore[attr-defined]
        f = r["fresh_accepted_to_first_flag_s"]
        table.add_row(
            "on" if r["mode"] == "lanes" else "off (peer)",
            f"{r['capacity_images_per_s']:.1f}",
            f"{r['drain_s']:.1f}",
            f"{r['drain_images_per_s']:.1f}",
            f"{r['drain_share_of_capacity']:.2f}",
            f"{f['n']}/{r['fresh_sent']}",
            f"{f['p50']:.2f}",
            f"[bold]{f['p95']:.2f}",
            f"{f['max']:.2f}",
            f"{r['lost_images']}/{r['unflagged_studies']}",
            f"{r['duplicate_predictions'] + r['duplicate_history_events']}",
            ", ".join(f"{k} {v}" for k, v in sorted(r["study_lanes"].items())),
            f"{r['loadavg_before'][0]:.1f}-{r['loadavg_after'][0]:.1f}",
        )
    console.print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=3000, help="backlog images")
    parser.add_argument("--associations", type=int, default=4, help="storescu associations for the backlog")
    parser.add_argument("--fresh-rate", type=float, default=0.5, help="fresh single-image studies per second")
    parser.add_argument("--fresh-high", action="store_true", help="fresh C-STORE with Priority HIGH (else MEDIUM)")
    parser.add_argument("--fresh-max", type=int, default=0, help="fresh studies made (0: enough for a slow drain)")
    parser.add_argument("--capacity-n", type=int, default=300, help="images of the capacity burst")
    parser.add_argument("--backlog-age-days", type=int, default=30, help="the backlog's study date, days ago")
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=["lanes", "off"])
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds a catch-up may take")
    parser.add_argument("--json-out", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="keep the run's files (logs, DBs) here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pt-bench-backlog-") as tmp:
        result = run(args, args.workdir or Path(tmp))
    report(result)
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
