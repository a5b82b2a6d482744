"""SR delivery benchmark (issue 23): the aggregator's supervised SR queue against a real Orthanc.

Three figures, one aggregator in-process (SQLite, no broker: events applied directly, as the tests
do), the SR frozen from a real stored X-ray header (one shared file, read per study):

1. **Throughput**: a backlog of `--n` URGENT studies queued while no sender runs, then drained to a
   healthy Orthanc by the sender loop: SRs/s delivered (frozen + C-STOREd + recorded).
2. **Flag -> SR in the PACS**: `--single` studies flagged URGENT one at a time (`--single-rate` per
   second) while the sender loop runs: the time from the flag's commit (the delivery row's
   created_at, written in the flag's transaction) to Orthanc's C-STORE acknowledgement (sent_at),
   p50/p95/max. URGENT is not held; a non-URGENT change waits PT_AGGREGATOR_SR_SETTLE_S (5 s) more.
3. **Outage**: two destinations, a socket that accepts TCP and never answers (a silent PACS) and a
   second, healthy Orthanc, while `--n` studies are flagged: when the healthy one has the first and
   the last SR (it must not wait for the silent one); then the silent one relays to the real Orthanc
   (the PACS is back): the time until the first SR arrives there (the breaker's back-off and jitter),
   until the last, the drain rate, and how many associations and timeouts the outage cost.

The sender runs with the service's defaults (batch 50, ACSE timeout 10 s, retry 5 s doubling to
300 s, jittered) unless given. Every SR is checked in Orthanc at the end (lost / duplicated).

    .venv/bin/python bench/sr_delivery.py --n 1000 --single 50
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
LOAD0 = " ".join(f"{x:.2f}" for x in os.getloadavg())

from prometheus_client import REGISTRY  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402
from sqlalchemy import func, select  # noqa: E402

from harness.aggregator_events import apply_events, prediction, received, write_test_policy  # noqa: E402
from harness.dicom_peers import DCMTK_NODELAY_ENV, Orthanc  # noqa: E402
from harness.silent_pacs import SwitchablePeer  # noqa: E402
from services.aggregator.config import AggregatorSettings  # noqa: E402
from services.aggregator.models import SrDelivery, SrSend  # noqa: E402
from services.aggregator.service import Aggregator  # noqa: E402

console = Console()
SHARED_DICOM = ROOT.parent / "shared" / "data" / "dicom"


def source_file() -> Path:
    for line in (SHARED_DICOM / "LABELS.txt").read_text().splitlines():
        cls, name = line.split()[:2]
        if cls == "PNEUMONIA":
            return (SHARED_DICOM / f"{name}.dcm").resolve()
    raise SystemExit(f"no PNEUMONIA file in {SHARED_DICOM}")


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


async def make_aggregator(work: Path, dest: str, args: argparse.Namespace) -> Aggregator:
    settings = AggregatorSettings(
        data_dir=work,
        policy_file=write_test_policy(work / "policy.yaml"),
        sr_destination=dest,
        secret_key="bench",
        sr_batch_size=args.batch,
        sr_acse_timeout_s=args.acse_timeout,
        sr_retry_seconds=args.retry,
        sr_backoff_max_s=args.backoff_max,
    )
    agg = Aggregator(settings)
    await agg.migrate()
    return agg


async def flag_studies(agg: Aggregator, tag: str, n: int, uri: str) -> None:
    for i in range(n):
        study, sop = f"1.2.826.0.1.99.{tag}.{i}", f"1.2.826.0.1.99.{tag}.{i}.1"
        await apply_events(agg, received(sop, study, storage_uri=uri), prediction(sop, 0.97, study=study))


async def sent_count(agg: Aggregator, prefix: str, destination: str | None = None) -> int:
    """SR revisions of studies `prefix`* sent to every destination, or to the one named."""
    if destination is None:
        query = select(func.count(SrDelivery.id)).where(
            SrDelivery.status == "sent", SrDelivery.study_uid.like(prefix + "%")
        )
    else:
        query = (
            select(func.count(SrSend.id))
            .join(SrDelivery, SrDelivery.id == SrSend.delivery_id)
            .where(SrSend.destination == destination, SrSend.status == "sent", SrDelivery.study_uid.like(prefix + "%"))
        )
    async with agg.sessions() as s:
        return int((await s.execute(query)).scalar() or 0)


async def wait_sent(
    agg: Aggregator, prefix: str, n: int, timeout: float, destination: str | None = None
) -> float | None:
    """Seconds until n deliveries of `prefix` are sent (to `destination`, else to all; None: not within timeout)."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if await sent_count(agg, prefix, destination) >= n:
            return time.monotonic() - start
        await asyncio.sleep(0.05)
    return None


async def run(args: argparse.Namespace) -> None:
    uri = source_file().as_uri()
    work = Path(tempfile.mkdtemp(prefix="pt-bench-sr-"))
    results: list[tuple[str, str]] = []
    # TCP_NODELAY=1 as dcmtk (Orthanc's network layer) recommends: without it each C-STORE
    # response may wait ~40 ms (../shared/RUNTIME-NOTES.md)
    with Orthanc(aet="BENCHPACS", base_dir=work / "orthanc", env=DCMTK_NODELAY_ENV) as pacs:
        # 1 + 2: a healthy Orthanc.
        agg = await make_aggregator(work / "a1", f"127.0.0.1:{pacs.dicom_port}:{pacs.aet}", args)
        stop = asyncio.Event()
        try:
            t = time.monotonic()
            await flag_studies(agg, "1", args.n, uri)
            console.print(f"queued {args.n} URGENT studies in {time.monotonic() - t:.1f} s (no sender running)")
            loop = asyncio.create_task(agg.sr_loop(stop))
            first_sr = await wait_sent(agg, "1.2.826.0.1.99.1.", 1, args.timeout)
            took = await wait_sent(agg, "1.2.826.0.1.99.1.", args.n, args.timeout)
            assert first_sr is not None and took is not None, "backlog not drained"
            took += first_sr
            results.append(
                (
                    "throughput: backlog drained to Orthanc",
                    f"{args.n} SRs in {took:.1f} s = {args.n / took:.1f} SRs/s (built + sent); first SR after "
                    f"{first_sr:.1f} s",
                )
            )
            console.print(results[-1])
            if args.single:
                for i in range(args.single):
                    await flag_studies(agg, f"2.{i}", 1, uri)
                    agg._sr_wake.set()  # what after_commit does when a flag change queued an SR
                    await asyncio.sleep(1 / args.single_rate)
                assert await wait_sent(agg, "1.2.826.0.1.99.2.", args.single, 60) is not None
                async with agg.sessions() as s:
                    rows = (
                        await s.scalars(select(SrDelivery).where(SrDelivery.study_uid.like("1.2.826.0.1.99.2.%")))
                    ).all()
                lat = [(r.sent_at - r.created_at).total_seconds() for r in rows]
                results.append(
                    (
                        f"flag -> SR in the PACS ({args.single} URGENT studies at {args.single_rate:g}/s)",
                        f"p50 {statistics.median(lat) * 1000:.0f} ms, p95 {pct(lat, 0.95) * 1000:.0f} ms, "
                        f"max {max(lat) * 1000:.0f} ms",
                    )
                )
                console.print(results[-1])
            stop.set()
            await asyncio.wait_for(loop, 60)
        finally:
            stop.set()
            await agg.engine.dispose()

        # 3: a silent PACS beside a healthy one (a second Orthanc), then the real Orthanc behind the
        # silent one's address.
        peer = SwitchablePeer()
        healthy = Orthanc(aet="BENCHHEALTHY", base_dir=work / "orthanc2", env=DCMTK_NODELAY_ENV).start()
        agg = await make_aggregator(
            work / "a3",
            f"SILENT=127.0.0.1:{peer.port}:{pacs.aet},HEALTHY=127.0.0.1:{healthy.dicom_port}:{healthy.aet}",
            args,
        )
        label = f"{pacs.aet}@127.0.0.1:{peer.port}"
        stop = asyncio.Event()
        loop = asyncio.create_task(agg.sr_loop(stop))
        try:
            t = time.monotonic()
            await flag_studies(agg, "3", args.n, uri)
            queued = time.monotonic() - t
            healthy_first = await wait_sent(agg, "1.2.826.0.1.99.3.", 1, args.timeout, "HEALTHY")
            healthy_all = await wait_sent(agg, "1.2.826.0.1.99.3.", args.n, args.timeout, "HEALTHY")
            assert healthy_first is not None and healthy_all is not None, "the healthy PACS was held up"
            healthy_all = time.monotonic() - t
            results.append(
                (
                    f"the healthy PACS beside the silent one ({args.n} studies flagged from t=0)",
                    f"first SR at {queued + healthy_first:.1f} s (queueing took {queued:.1f} s), all {args.n} at "
                    f"{healthy_all:.1f} s; held SILENT: {args.n} pending",
                )
            )
            console.print(results[-1])
            await asyncio.sleep(max(0.0, args.outage - (time.monotonic() - t)))
            timeouts = REGISTRY.get_sample_value(
                "pt_aggregator_sr_failures_total", {"destination": label, "reason": "timeout"}
            )
            associations = peer.accepted
            breaker = agg.sr_breaker.describe() if agg.sr_breaker else {}
            console.print(
                f"outage {time.monotonic() - t:.0f} s (queueing {args.n} took {queued:.1f} s): "
                f"{associations} associations, {timeouts or 0:.0f} ACSE timeouts; breaker {breaker}"
            )
            peer.target = pacs.dicom_port
            back = time.monotonic()
            first = await wait_sent(agg, "1.2.826.0.1.99.3.", 1, args.timeout, "SILENT")
            assert first is not None
            rest = await wait_sent(agg, "1.2.826.0.1.99.3.", args.n, args.timeout, "SILENT")
            assert rest is not None, "backlog after the outage not drained"
            total = time.monotonic() - back
            drain = total - first
            results.append(
                (
                    f"outage: {args.n}-SR backlog behind a silent PACS ({time.monotonic() - t - total:.0f} s)",
                    f"{associations} associations / {timeouts or 0:.0f} ACSE timeouts during it; PACS back -> "
                    f"first SR {first:.1f} s (back-off), -> all {total:.1f} s; drain {drain:.1f} s = "
                    f"{args.n / max(drain, 1e-9):.1f} SRs/s (through the relaying socket)",
                )
            )
            console.print(results[-1])
        finally:
            stop.set()
            await asyncio.wait_for(loop, 120)
            peer.close()
            await agg.engine.dispose()
            beside = healthy.get("/statistics")["CountInstances"]
            healthy.stop()
        results.append(("in the healthy Orthanc", f"{beside} instances, expected {args.n} SRs"))
        stats = pacs.get("/statistics")
        expected = 2 * args.n + args.single
        results.append(("in Orthanc", f"{stats['CountInstances']} instances, expected {expected} SRs"))
    table = Table(title="SR delivery (bench/sr_delivery.py)")
    table.add_column("measure")
    table.add_column("result")
    for k, v in results:
        table.add_row(k, v)
    console.print(table)
    console.print(f"load average before/after: {LOAD0} / {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    console.print(f"CPUs: {os.cpu_count()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1000, help="SRs in the backlog (throughput and outage runs)")
    ap.add_argument("--single", type=int, default=50, help="studies flagged one at a time for flag -> SR latency")
    ap.add_argument("--single-rate", type=float, default=2.0, help="those studies per second")
    ap.add_argument("--outage", type=float, default=30.0, help="seconds the PACS stays silent (at least)")
    ap.add_argument("--batch", type=int, default=50, help="PT_AGGREGATOR_SR_BATCH_SIZE")
    ap.add_argument("--acse-timeout", type=float, default=10.0, help="PT_AGGREGATOR_SR_ACSE_TIMEOUT_S")
    ap.add_argument("--retry", type=float, default=5.0, help="PT_AGGREGATOR_SR_RETRY_SECONDS")
    ap.add_argument("--backoff-max", type=float, default=300.0, help="PT_AGGREGATOR_SR_BACKOFF_MAX_S")
    ap.add_argument("--timeout", type=float, default=1800.0, help="give up a phase after this many seconds")
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
