"""Scaling benchmark: the same real X-rays through three set-ups in one run, so the ratios hold on
whatever machine runs it:

  sqlite    the default: one process per service, one RabbitMQ node (classic queues), SQLite
  pg-r1     one process per service on PostgreSQL + a 3-node RabbitMQ cluster (quorum queues)
  pg-r2     two processes per service, same PostgreSQL + 3-node cluster (and so on for --replicas)

    python bench/scaling.py --n 300 --associations 4 --replicas 1 2 [--json-out result.json]

Per set-up: sustained images/s (acknowledged images / from the first C-STORE to the last study's
first flag), C-STORE accepted -> study's first flag (p50/p95, model only: no crowd), and the CPU
seconds each part used (services, RabbitMQ nodes, PostgreSQL; from /proc) against the wall time,
which says what the run was limited by (cores used vs cores available).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from harness.postgres import PostgresServer  # noqa: E402
from harness.rabbit_cluster import RabbitCluster  # noqa: E402
from harness.rabbitmq import RabbitNode  # noqa: E402
from harness.system_cluster import ScaleOut  # noqa: E402
from harness.system_harness import SystemHarness  # noqa: E402
from harness.system_reconcile import DbReader  # noqa: E402
from harness.system_scenario import FAST_ENV, Batch, make_batch, model_env  # noqa: E402

console = Console()
SHARED = Path(os.environ.get("PT_SHARED_DATA", REPO.parent / "shared" / "data"))
CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- CPU from /proc --------------------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, cpu seconds user+system) of every process."""
    out: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLK_TCK)
    return out


def tree_cpu(roots: list[int], table: dict[int, tuple[int, float]] | None = None) -> float:
    """CPU seconds of the processes under `roots` (themselves and every live descendant)."""
    table = table or _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _cpu) in table.items():
        children.setdefault(ppid, []).append(pid)
    total, stack, seen = 0.0, list(roots), set()
    while stack:
        pid = stack.pop()
        if pid in seen or pid not in table:
            continue
        seen.add(pid)
        total += table[pid][1]
        stack += children.get(pid, [])
    return total


def postgres_pids(server: PostgresServer) -> list[int]:
    try:
        return [int((server.data / "postmaster.pid").read_text().split()[0])]
    except (OSError, ValueError, IndexError):
        return []


class CpuMeter:
    """CPU seconds used by each part between start() and stop()."""

    def __init__(self, parts: dict[str, list[int]]) -> None:
        self.parts = parts
        self.before: dict[str, float] = {}
        self.used: dict[str, float] = {}

    def start(self) -> None:
        table = _proc_table()
        self.before = {name: tree_cpu(pids, table) for name, pids in self.parts.items()}

    def stop(self) -> dict[str, float]:
        table = _proc_table()
        self.used = {name: round(tree_cpu(pids, table) - self.before[name], 1) for name, pids in self.parts.items()}
        return self.used


# ---- measures --------------------------------------------------------------------------------------
def pct(values: list[float], q: float) -> float:
    """Linear-interpolated quantile q (0-1), as bench/e2e.py reports it; NaN when empty."""
    return float(np.percentile(values, q * 100)) if values else float("nan")


def epoch(value: object) -> float | None:
    if value is None or value == "":
        return None
    dt = value if isinstance(value, datetime) else datetime.fromisoformat(str(value))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def flagged_studies(db: DbReader) -> int:
    rows = db.query("aggregator", "SELECT count(*) FROM aggregator_studies WHERE first_flag_at IS NOT NULL")
    return int(rows[0][0]) if rows else 0


def db_bytes(system: SystemHarness, db: DbReader) -> int:
    """Size of every service's tables: the PostgreSQL database, or the SQLite files (+ WAL)."""
    if db.pg_dsn:
        return int(db.query("ingest", "SELECT pg_database_size(current_database())")[0][0])
    return sum(p.stat().st_size for p in system.data_dir.glob("*.db*"))


def measure(system: SystemHarness, batch: Batch, associations: int, meter: CpuMeter, timeout: float) -> dict:
    db = DbReader(system)
    studies = len(batch.studies)
    size_before = db_bytes(system, db)
    meter.start()
    t0 = time.time()
    sent = system.send(batch.paths, associations=associations)
    send_s = time.time() - t0
    deadline = time.monotonic() + timeout
    while flagged_studies(db) < studies and time.monotonic() < deadline:
        time.sleep(0.5)
    wall = time.time() - t0
    cpu = meter.stop()
    flags = {s: epoch(f) for s, f in db.query("aggregator", "SELECT study_uid, first_flag_at FROM aggregator_studies")}
    first_seen: dict[str, float] = {}
    for study, received in db.query("aggregator", "SELECT study_uid, received_at FROM aggregator_images"):
        t = epoch(received)
        if t is not None:
            first_seen[study] = min(t, first_seen.get(study, t))
    latencies = [flags[s] - first_seen[s] for s in flags if flags[s] and s in first_seen]  # type: ignore[operator]
    last_flag = max((f for f in flags.values() if f), default=t0 + wall)
    span = max(1e-6, last_flag - t0)
    return {
        "acknowledged": len(sent.acked),
        "studies_flagged": sum(1 for f in flags.values() if f),
        "studies": studies,
        "send_s": round(send_s, 1),
        "span_s": round(span, 1),
        "images_per_s": round(len(sent.acked) / span, 2),
        "accept_to_first_flag_s": {
            "p50": round(pct(latencies, 0.5), 2),
            "p95": round(pct(latencies, 0.95), 2),
            "mean": round(statistics.fmean(latencies), 2) if latencies else None,
        },
        "db_bytes_per_image": round((db_bytes(system, db) - size_before) / max(1, len(sent.acked))),
        "cpu_s": cpu,
        "cores_used": round(sum(cpu.values()) / span, 2),
        # machine-independent-ish: what one image costs in CPU, summed over every part
        "cpu_s_per_image": round(sum(cpu.values()) / max(1, len(sent.acked)), 4),
    }


# ---- set-ups ---------------------------------------------------------------------------------------
@contextmanager
def sqlite_setup(base: Path) -> Iterator[tuple[SystemHarness, CpuMeter]]:
    node = RabbitNode().start()
    system = SystemHarness(node, base / "system", env={**FAST_ENV, **model_env()})
    try:
        system.start()
        parts = {name: [c.pid] for name, c in system.children.items() if c.pid}
        parts["rabbitmq"] = [node.process.pid] if node.process else []
        yield system, CpuMeter(parts)
    finally:
        system.stop()
        node.stop()


@contextmanager
def cluster_setup(
    base: Path, replicas: int, cluster: RabbitCluster, postgres: PostgresServer
) -> Iterator[tuple[SystemHarness, CpuMeter]]:
    with ScaleOut(base, replicas=replicas, cluster=cluster, postgres=postgres) as run:
        assert run.system is not None
        parts: dict[str, list[int]] = {}
        for name, child in run.system.children.items():
            parts.setdefault(name.split("-")[0], []).append(child.pid or -1)
        parts["rabbitmq"] = [n.process.pid for n in cluster.nodes if n.process]
        parts["postgres"] = postgres_pids(postgres)
        yield run.system, CpuMeter(parts)


def create_database(server: PostgresServer, name: str) -> str:
    import asyncio

    import asyncpg

    async def create() -> None:
        conn = await asyncpg.connect(server.dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return name


def run(n: int, associations: int, replicas: list[int], workdir: Path, timeout: float) -> dict:
    batch = make_batch(SHARED, workdir / "dicom", n, seed=n)
    results: dict[str, dict] = {"_meta": {"images": n, "associations": associations, "cpus": os.cpu_count(),
                                          "loadavg_before": os.getloadavg()}}  # fmt: skip
    console.print(f"[bold]sqlite[/bold]: default single-process set-up, {n} images")
    with sqlite_setup(workdir / "sqlite") as (system, meter):
        results["sqlite"] = measure(system, batch, associations, meter, timeout)
    console.print(results["sqlite"])
    postgres = PostgresServer().start()
    cluster = RabbitCluster(3).start()
    try:
        for r in replicas:
            # a fresh database per set-up on the same server: the same SOP instances are sent again
            postgres.database = create_database(postgres, f"pt_r{r}")
            console.print(f"[bold]pg-r{r}[/bold]: {r} process(es) per service, PostgreSQL + 3-node cluster")
            with cluster_setup(workdir / f"pg-r{r}", r, cluster, postgres) as (system, meter):
                results[f"pg-r{r}"] = measure(system, batch, associations, meter, timeout)
            console.print(results[f"pg-r{r}"])
    finally:
        cluster.stop()
        postgres.stop()
    results["_meta"]["loadavg_after"] = os.getloadavg()
    return results


def report(results: dict) -> None:
    meta = results["_meta"]
    table = Table(title=f"scaling: {meta['images']} images, {meta['associations']} associations")
    for col in ("set-up", "images/s", "p50 s", "p95 s", "cores used", "CPU s/image", "DB bytes/image", "CPU s by part"):
        table.add_column(col)
    for name, r in results.items():
        if name.startswith("_"):
            continue
        lat = r["accept_to_first_flag_s"]
        parts = ", ".join(f"{k} {v:.0f}" for k, v in sorted(r["cpu_s"].items(), key=lambda kv: -kv[1]))
        table.add_row(name, f"{r['images_per_s']:.2f}", f"{lat['p50']:.2f}", f"{lat['p95']:.2f}",
                      f"{r['cores_used']:.2f}", f"{r['cpu_s_per_image']:.3f}", str(r["db_bytes_per_image"]),
                      parts)  # fmt: skip
    console.print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--associations", type=int, default=4)
    ap.add_argument("--replicas", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds to wait for every study's first flag")
    ap.add_argument("--json-out", type=Path)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pt-scaling-") as tmp:
        results = run(args.n, args.associations, args.replicas, Path(tmp), args.timeout)
    report(results)
    if args.json_out:
        args.json_out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
