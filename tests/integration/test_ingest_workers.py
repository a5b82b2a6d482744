"""PT_INGEST_WORKERS=2: two SCP processes accept from one DICOM port and commit to one SQLite database.

Each image is stored and announced once even when the same instance arrives on associations held by
different processes at the same moment; a worker that dies stops the service with a non-zero exit
(its supervisor restarts it); a primary killed with -9 takes its workers down, so the port is free
for the restart."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import sqlite3
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pydicom

from harness.dicom_peers import STORESCU
from harness.processes import children_of
from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from tests.support.ingest_service import AE_TITLE, IngestProcess, drain, run


def port_closed(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) != 0


async def workers_ready(proc: IngestProcess, count: int) -> dict[str, Any]:
    """The primary's /healthz once `count` processes (itself included) accept."""

    async def ready() -> dict[str, Any] | None:
        async with httpx.AsyncClient() as client:
            checks = (await client.get(f"http://127.0.0.1:{proc.http_port}/healthz", timeout=5)).json()["checks"]
        return checks["workers"] if checks["workers"]["alive"] == count else None

    return await eventually_async(ready, timeout=60, what=f"{count} ingest processes", ignore=(httpx.HTTPError,))


def received(metrics: str) -> float:
    return sum(float(v) for v in re.findall(r'^pt_ingest_received_total\{outcome="\w+"\} (\S+)$', metrics, re.M))


async def test_two_workers_share_the_port_and_store_each_instance_once(
    tmp_path: Path, rabbit: RabbitNode, broker: object, shared_data: Path
) -> None:
    from services.ingest.tools.make_dicom import make_dicom_file

    images = sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[200:248]
    files = [make_dicom_file(p, tmp_path / "in", transfer_syntax="explicit", bits=12, size=256) for p in images]
    same = files[0]  # sent on every association at once: different processes race for one UID
    proc = await IngestProcess(tmp_path / "var", rabbit.url, PT_INGEST_WORKERS="2").start()
    try:
        await workers_ready(proc, 2)
        senders = 8
        chunks = [[same, *files[1 + k :: senders]] for k in range(senders)]
        results = await asyncio.gather(
            *(
                run([STORESCU, "-aet", f"W{k}", "-aec", AE_TITLE, "127.0.0.1", str(proc.dicom_port), *map(str, c)])
                for k, c in enumerate(chunks)
            )
        )
        assert all(r.returncode == 0 for r in results), [r.stderr for r in results]  # no 0xA700 either
        events = await drain(rabbit.url, "inference.images", expected=len(files), timeout=60, settle=2.0)
        async with httpx.AsyncClient() as client:
            health = (await client.get(f"http://127.0.0.1:{proc.http_port}/healthz", timeout=10)).json()
            ports = [proc.http_port, *health["checks"]["workers"]["http_ports"]]
            per_process = [
                received((await client.get(f"http://127.0.0.1:{port}/metrics", timeout=10)).text) for port in ports
            ]
    finally:
        assert await asyncio.to_thread(proc.stop, signal.SIGTERM) == 0
    counts = Counter(p.image.sop_instance_uid for _, p in events)
    uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    assert set(counts) == uids and max(counts.values()) == 1
    db = sqlite3.connect(tmp_path / "var" / "ingest.db")
    assert db.execute("SELECT count(*) FROM ingest_instances").fetchone()[0] == len(files)
    assert db.execute("SELECT count(*) FROM ingest_outbox").fetchone()[0] == len(files)
    assert {k: v for k, v in health["checks"]["workers"].items() if k != "http_ports"} == {
        "ok": True,
        "configured": 2,
        "alive": 2,
    }
    # every C-STORE was answered by one of the two processes (duplicates included)
    assert sum(per_process) == len(files) + senders - 1
    assert all(n > 0 for n in per_process), per_process  # both processes took associations


async def test_a_dead_worker_stops_the_service_non_zero(tmp_path: Path, rabbit: RabbitNode) -> None:
    proc = await IngestProcess(tmp_path / "var", rabbit.url, PT_INGEST_WORKERS="3").start()
    await workers_ready(proc, 3)
    primary = proc.process.process
    assert primary is not None
    workers = children_of(primary.pid)
    assert len(workers) == 2
    os.kill(workers[0], signal.SIGKILL)
    assert await asyncio.to_thread(proc.process.wait, 60) == 1
    await eventually_async(lambda: port_closed(proc.dicom_port), 30, what="the DICOM port closed")  # all stopped
    assert "ingest worker exited" in proc.log.read_text()


async def test_primary_killed_takes_its_workers_down_and_restarts(
    tmp_path: Path, rabbit: RabbitNode, broker: object, shared_data: Path
) -> None:
    from services.ingest.tools.make_dicom import make_dicom_file

    data_dir = tmp_path / "var"
    proc = await IngestProcess(data_dir, rabbit.url, PT_INGEST_WORKERS="2").start()
    await workers_ready(proc, 2)
    primary = proc.process.process
    assert primary is not None
    (worker,) = children_of(primary.pid)
    proc.stop(signal.SIGKILL)
    await eventually_async(lambda: not Path(f"/proc/{worker}").exists(), 30, what="the worker gone")
    await eventually_async(lambda: port_closed(proc.dicom_port), 10, what="the DICOM port closed")

    same_ports = {"PT_INGEST_PORT": str(proc.dicom_port), "PT_INGEST_HTTP_PORT": str(proc.http_port)}
    again = IngestProcess(data_dir, rabbit.url, PT_INGEST_WORKERS="2", **same_ports)
    again.dicom_port, again.http_port = proc.dicom_port, proc.http_port
    await again.start()
    await workers_ready(again, 2)
    try:
        image = sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[300]
        file = make_dicom_file(image, tmp_path / "in", transfer_syntax="explicit", bits=12, size=256)
        sent = await run([STORESCU, "-aet", "AGAIN", "-aec", AE_TITLE, "127.0.0.1", str(again.dicom_port), str(file)])
        assert sent.returncode == 0, sent.stderr
        assert len(await drain(rabbit.url, "inference.images", expected=1, timeout=30)) == 1
    finally:
        assert await asyncio.to_thread(again.stop, signal.SIGTERM) == 0
