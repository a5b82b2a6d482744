"""Faults in the middle of a run, each its own test, on the real system (four service processes,
real RabbitMQ, dcmtk storescu as the modality): kill -9 of each service and restart; RabbitMQ
stopped and started; a service's database locked past its busy timeout; the image store made
unwritable. Afterwards every C-STORE-acknowledged image has exactly one current triage result (or
a dead-letter entry with its reason), nothing is duplicated, and DB, broker and store reconcile.

The default run keeps two small variants (kill -9 of ingest, broker outage; 24 images each);
`-m slow` runs every fault on 300 images.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from harness.rabbitmq import RabbitNode
from harness.system_faults import (
    broker_outage,
    chattr_available,
    kill_and_restart,
    lock_db_for,
    run_with_fault,
    store_unwritable_for,
)
from harness.system_harness import SystemHarness
from harness.system_scenario import FAST_ENV, Batch, make_batch, model_env
from tests.support.metrics import counter_total

SMALL, BIG = 24, 300


@pytest.fixture
def system_factory(rabbit: RabbitNode, tmp_path: Path) -> Iterator[Callable[[], SystemHarness]]:
    started: list[SystemHarness] = []

    def start() -> SystemHarness:
        system = SystemHarness(rabbit, tmp_path / "system", env={**FAST_ENV, **model_env()}).start()
        started.append(system)
        return system

    yield start
    for system in started:
        system.stop()


def batch_of(shared_data: Path, tmp_path: Path, n: int) -> Batch:
    return make_batch(shared_data, tmp_path / "dicom", n, seed=n)


def assert_accounted(rec: object) -> None:
    problems = rec.problems()  # type: ignore[attr-defined]
    assert problems == [], rec.table()  # type: ignore[attr-defined]


def _kill9(
    system_factory: Callable[[], SystemHarness], shared_data: Path, tmp_path: Path, service: str, n: int
) -> None:
    system = system_factory()
    batch = batch_of(shared_data, tmp_path, n)
    restarts_before = system.children[service].starts
    rec, sent = run_with_fault(system, batch, lambda: kill_and_restart(system, service))
    assert system.children[service].starts == restarts_before + 1
    assert_accounted(rec)
    if service != "ingest":
        assert len(sent.acked) == n, "only ingest's death may refuse C-STOREs"
    assert len(rec.acked) == n, "the re-sent images were acknowledged after the restart"


def test_kill9_ingest_mid_run(system_factory, shared_data: Path, tmp_path: Path) -> None:
    """The default-run variant: the service whose death matters most to the sender."""
    _kill9(system_factory, shared_data, tmp_path, "ingest", SMALL)


@pytest.mark.slow
@pytest.mark.parametrize("service", ["ingest", "inference", "labeling", "aggregator"])
def test_kill9_mid_run_big(system_factory, shared_data: Path, tmp_path: Path, service: str) -> None:
    _kill9(system_factory, shared_data, tmp_path, service, BIG)


def _broker(system_factory: Callable[[], SystemHarness], shared_data: Path, tmp_path: Path, n: int) -> None:
    system = system_factory()
    batch = batch_of(shared_data, tmp_path, n)
    rec, sent = run_with_fault(system, batch, lambda: broker_outage(system, down_s=10))
    assert len(sent.acked) == n, "ingest keeps accepting while the broker is down (outbox)"
    assert_accounted(rec)


def test_rabbitmq_stop_start_mid_run(system_factory, shared_data: Path, tmp_path: Path) -> None:
    _broker(system_factory, shared_data, tmp_path, SMALL)


@pytest.mark.slow
def test_rabbitmq_stop_start_mid_run_big(system_factory, shared_data: Path, tmp_path: Path) -> None:
    _broker(system_factory, shared_data, tmp_path, BIG)


@pytest.mark.slow
@pytest.mark.parametrize("service", ["ingest", "aggregator", "labeling"])
def test_database_locked_past_busy_timeout(system_factory, shared_data: Path, tmp_path: Path, service: str) -> None:
    """SQLite's write lock held for 40 s (> the 30 s busy timeout): writers fail, retry, recover."""
    system = system_factory()
    batch = batch_of(shared_data, tmp_path, BIG)
    rec, _sent = run_with_fault(system, batch, lambda: lock_db_for(system, service, 40.0), settle_timeout=400)
    assert_accounted(rec)
    assert all(c.alive() for c in system.children.values()), "no service died of a locked database"
    if service in ("aggregator", "labeling"):  # the lock really bit: handlers failed and were retried
        queue = f"{service}.{'events' if service == 'aggregator' else 'images'}"
        metrics = system.metrics_text(service)
        retried = counter_total(metrics, "pt_broker_messages_consumed", queue=queue, outcome="retried")
        # the aggregator applies batches: a failed batch is handled again one message at a time
        failed_batches = counter_total(metrics, "pt_broker_batches_failed", queue=queue)
        print(f"{queue}: {retried:.0f} deliveries retried, {failed_batches:.0f} batches failed while locked")
        assert retried + failed_batches > 0


@pytest.mark.slow
def test_store_unwritable_mid_run(system_factory, shared_data: Path, tmp_path: Path) -> None:
    if not chattr_available(tmp_path):
        # optional: the filesystem (overlayfs, tmpfs) or the container may not support the attribute
        pytest.skip("optional: chattr +i is not supported on this filesystem (root ignores permission bits)")
    system = system_factory()
    batch = batch_of(shared_data, tmp_path, BIG)
    rec, _sent = run_with_fault(system, batch, lambda: store_unwritable_for(system, 8.0))
    assert_accounted(rec)
    assert all(c.alive() for c in system.children.values())
    # nothing half-written: every file in the store is a stored instance's complete file
    files = [p for p in (system.data_dir / "store").rglob("*") if p.is_file()]
    assert len(files) == rec.store_files == len(rec.ingest_instances)


@pytest.mark.slow
@pytest.mark.postgres
def test_postgres_down_mid_run(rabbit: RabbitNode, shared_data: Path, tmp_path: Path) -> None:
    """All four services on one PostgreSQL (the production setup); the server is stopped for 15 s
    mid-run and started again: C-STOREs during the outage are refused (0xA700) and re-sent,
    consumers retry, nothing acknowledged is lost or doubled."""
    from harness.system_faults import postgres_outage
    from tests.support.postgres import PostgresCluster

    cluster = PostgresCluster().start()
    system = SystemHarness(rabbit, tmp_path / "system", env={**FAST_ENV, **model_env(), "PT_DATABASE_URL": cluster.url})
    try:
        system.start()
        assert not list(system.data_dir.glob("*.db")), "no SQLite file: every service is on PostgreSQL"
        batch = batch_of(shared_data, tmp_path, BIG)
        rec, _sent = run_with_fault(system, batch, lambda: postgres_outage(cluster, 15.0), settle_timeout=400)
        assert_accounted(rec)
        assert len(rec.acked) == BIG
    finally:
        system.stop()
        cluster.stop()
