"""Smoke test of the scale-out path, in the default suite: a real 3-node RabbitMQ cluster with
quorum queues, one PostgreSQL server, and two processes of every service (two ingest SCPs under
one AE title on two ports, two competing consumers on every queue, two outbox relays per
producer). A few real X-rays go in over four associations; every acknowledged image ends with
exactly one stored instance, one prediction, one labeling task and one current flag per study,
and the work was really shared (each replica handled some of it).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.metrics import counter_total
from tests.support.system_cluster import CONSUMED_QUEUES, ScaleOut
from tests.support.system_reconcile import wait_reconciled
from tests.support.system_scenario import make_batch
from tests.support.wait import eventually

pytestmark = pytest.mark.postgres
N_IMAGES = 12


@pytest.fixture(scope="module")
def scale_out(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ScaleOut]:
    with ScaleOut(tmp_path_factory.mktemp("scale-out"), replicas=2) as run:
        yield run


def test_two_replicas_of_everything_on_a_three_node_cluster(
    scale_out: ScaleOut, shared_data: Path, tmp_path: Path
) -> None:
    system = scale_out.system
    assert system is not None
    assert len(scale_out.cluster.running_nodes()) == 3
    # the Erlang distribution of every node listens on loopback only
    for node, addresses in scale_out.dist_listeners().items():
        assert addresses and set(addresses) == {"127.0.0.1"}, (node, addresses)

    # every queue is a quorum queue on all three nodes; each work queue has one consumer per replica
    # A quorum queue registers a consumer through its Raft log: the count can lag a service's
    # "started" by a moment on a loaded machine, so wait for it (bounded) before asserting.
    def consumers_registered() -> dict[str, tuple[str, int, int]] | None:
        facts = scale_out.queue_facts()
        counted = all(facts.get(q, ("", 0, 0))[1] == len(system.replicas_of(s)) for q, s in CONSUMED_QUEUES.items())
        return facts if counted else None

    facts = eventually(consumers_registered, 30, 0.5, what="one consumer per replica on every work queue")
    assert facts and all(t == "quorum" and members == 3 for t, _c, members in facts.values()), facts
    for queue, service in CONSUMED_QUEUES.items():
        assert facts[queue][1] == len(system.replicas_of(service)) == 2, (queue, facts[queue])
    assert not list(system.data_dir.glob("*.db")), "no SQLite file: every service is on PostgreSQL"

    batch = make_batch(shared_data, tmp_path / "dicom", N_IMAGES, seed=13)
    sent = system.send(batch.paths, associations=4)
    assert len(sent.acked) == N_IMAGES, sent.refused
    rec = wait_reconciled(system, batch.acked_uids(sent), timeout=240)
    assert rec.problems() == [], rec.table()
    assert sum(len(v) for v in rec.dead_letters.values()) == 0

    # the work was shared: both ingest SCPs stored images, both replicas of each consumer consumed
    for name in system.replicas_of("ingest"):
        stored = counter_total(system.metrics_text_of(name), "pt_ingest_received", outcome="accepted")
        assert stored > 0, f"{name} stored nothing"
    for queue, service in CONSUMED_QUEUES.items():
        for name in system.replicas_of(service):
            ok = counter_total(system.metrics_text_of(name), "pt_broker_messages_consumed", queue=queue, outcome="ok")
            assert ok > 0, f"{name} consumed nothing from {queue}"
