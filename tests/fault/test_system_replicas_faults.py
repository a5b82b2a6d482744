"""Faults with replicas (slow): two processes of every service on a 3-node RabbitMQ cluster
(quorum queues) and PostgreSQL; 1,000 real X-rays over 4 associations (PT_REPLICA_FAULT_IMAGES
overrides); mid-run one replica of every service is killed with SIGKILL and restarted, one RabbitMQ
node is stopped and started again, PostgreSQL is restarted. Afterwards every acknowledged image is
stored once with one prediction, one labeling task and one current flag per study; nothing is
lost, nothing duplicated, the dead-letter queues are empty.

The same run as a command: `python bench/replica_faults.py --n 1000`.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from harness.system_cluster import ScaleOut, replica_faults
from harness.system_scenario import make_batch

pytestmark = [pytest.mark.slow, pytest.mark.postgres]
N_IMAGES = int(os.environ.get("PT_REPLICA_FAULT_IMAGES", "1000"))


def test_replicas_survive_kill9_broker_node_and_database_restart(shared_data: Path, tmp_path: Path) -> None:
    batch = make_batch(shared_data, tmp_path / "dicom", N_IMAGES, seed=1000)
    with ScaleOut(tmp_path / "run", replicas=2) as run:
        assert run.system is not None
        starts = {name: child.starts for name, child in run.system.children.items()}
        rec, _sent, events = replica_faults(run, batch, associations=4)
        restarted = [name for name, child in run.system.children.items() if child.starts > starts[name]]
        assert len(restarted) == 4, events  # one replica of each service was killed and came back
        assert len(run.cluster.running_nodes()) == 3
    assert rec.problems() == [], rec.table()
    assert len(rec.acked) == N_IMAGES, "every image was acknowledged in the end (re-sent after a refusal)"
    assert sum(len(v) for v in rec.dead_letters.values()) == 0, rec.table()
    assert len(rec.ingest_instances) == rec.ingest_rows == N_IMAGES
    assert len(rec.predictions) == N_IMAGES and max(rec.predictions.values()) == 1
    assert all(n == 1 for n in rec.study_rows.values()) and len(rec.study_rows) == len(batch.studies)
