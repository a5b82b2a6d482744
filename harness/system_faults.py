"""Faults injected into a running system (harness) while images flow, and the run around them:

    rec = run_with_fault(system, batch, lambda: kill_and_restart(system, "inference"))

The sender behaves like a PACS: what was not acknowledged is sent again after the fault (at most
a few rounds); afterwards every acknowledged image must be accounted for (system_reconcile).
"""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from harness.system_harness import SendResult, SystemHarness
from harness.system_reconcile import DbReader, Reconciliation, wait_reconciled
from harness.system_scenario import Batch
from harness.wait import eventually


def ingest_count(system: SystemHarness) -> int:
    try:
        return int(DbReader(system).query("ingest", "SELECT count(*) FROM ingest_instances")[0][0])
    except Exception:  # the database may be the thing that is down
        return 0


def run_with_fault(
    system: SystemHarness,
    batch: Batch,
    fault: Callable[[], None],
    trigger_fraction: float = 0.3,
    associations: int = 2,
    settle_timeout: float = 300.0,
    resend_rounds: int = 3,
) -> tuple[Reconciliation, SendResult]:
    """Send the batch; when ingest holds trigger_fraction of it, run fault() (which also repairs);
    re-send what was not acknowledged; wait until everything is accounted for."""
    box: dict[str, SendResult] = {}
    sender = threading.Thread(target=lambda: box.setdefault("sent", system.send(batch.paths, associations)))
    sender.start()
    target = max(1, int(len(batch.images) * trigger_fraction))
    eventually(lambda: not sender.is_alive() or ingest_count(system) >= target, 300, 0.05,
               what=f"ingest to hold {target} images")  # fmt: skip
    print(f"fault at {ingest_count(system)} of {len(batch.images)} images stored")
    fault()
    sender.join(timeout=900)
    total = box["sent"]
    print(f"first pass: {len(total.acked)} acknowledged, {len(total.refused)} refused or not sent (re-sent below)")
    for _ in range(resend_rounds):
        retry = [path for path, _status in total.refused]
        if not retry:
            break
        again = system.send(retry, associations=1)
        total.refused = again.refused
        total.acked += again.acked
    print(f"acknowledged {len(total.acked)}, never acknowledged {len(total.refused)}")
    rec = wait_reconciled(system, batch.acked_uids(total), timeout=settle_timeout)
    return rec, total


def kill_and_restart(system: SystemHarness, service: str, down_s: float = 2.0) -> None:
    system.kill9(service)
    time.sleep(down_s)  # how long the service stays down: the fault itself, not synchronisation
    system.restart(service)


def broker_outage(system: SystemHarness, down_s: float = 10.0) -> None:
    # rabbitmqctl can be slow on a loaded machine: give it time, the outage is what matters
    system.rabbit.ctl("stop_app", timeout=180)
    try:
        time.sleep(down_s)  # how long the broker stays down: the fault itself, not synchronisation
    finally:
        try:
            system.rabbit.start_app()
        except subprocess.CalledProcessError:
            # on a loaded machine the broker can take longer than start_app's 30 s await: wait longer
            system.rabbit.ctl("start_app", timeout=120, check=False)
            system.rabbit.wait_ready(timeout=180)


@contextlib.contextmanager
def db_locked(db: Path) -> Iterator[None]:
    """Hold SQLite's write lock on db (BEGIN EXCLUSIVE): the service's writers wait or fail."""
    conn = sqlite3.connect(db, timeout=60, isolation_level=None)
    try:
        conn.execute("BEGIN EXCLUSIVE")
        yield
    finally:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        conn.close()


def lock_db_for(system: SystemHarness, service: str, seconds: float) -> None:
    with db_locked(system.data_dir / f"{service}.db"):
        time.sleep(seconds)  # how long the lock is held: the fault itself, not synchronisation


def chattr_available(probe_dir: Path) -> bool:
    """Root ignores permission bits; the immutable attribute stops even root from writing."""
    if shutil.which("chattr") is None:
        return False
    probe = probe_dir / ".chattr-probe"
    probe.mkdir(parents=True, exist_ok=True)
    try:
        ok = subprocess.run(["chattr", "+i", str(probe)], capture_output=True).returncode == 0
        if ok:
            try:
                (probe / "x").touch()
                ok = False  # still writable: the attribute does not hold here
            except OSError:
                pass
        return ok
    finally:
        subprocess.run(["chattr", "-i", str(probe)], capture_output=True)
        shutil.rmtree(probe, ignore_errors=True)


def store_unwritable_for(system: SystemHarness, seconds: float) -> None:
    """Make every directory of the image store immutable (no new file anywhere; reads still work)."""
    store = system.data_dir / "store"
    store.mkdir(parents=True, exist_ok=True)
    subprocess.run(["chattr", "-R", "+i", str(store)], check=True, capture_output=True)
    try:
        time.sleep(seconds)  # how long the store stays unwritable: the fault itself, not synchronisation
    finally:
        subprocess.run(["chattr", "-R", "-i", str(store)], check=True, capture_output=True)


def postgres_outage(cluster: object, seconds: float) -> None:
    """Stop the PostgreSQL server (fast shutdown: connections are cut) and start it again."""
    from harness.postgres import as_postgres, pg_bin

    data, sock_dir, port = cluster.data, cluster.dir, cluster.port  # type: ignore[attr-defined]
    subprocess.run(as_postgres([pg_bin("pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]), check=True,
                   capture_output=True, timeout=120)  # fmt: skip
    try:
        time.sleep(seconds)  # how long PostgreSQL stays down: the fault itself, not synchronisation
    finally:
        opts = f"-p {port} -k {sock_dir} -c listen_addresses=127.0.0.1 -c fsync=on"
        subprocess.run(
            as_postgres([pg_bin("pg_ctl"), "-D", str(data), "-l", str(sock_dir / "log"), "-w", "-t", "60",
                          "-o", opts, "start"]),
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
