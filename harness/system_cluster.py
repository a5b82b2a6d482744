"""The scale-out setup for tests and benchmarks: a 3-node RabbitMQ cluster (quorum queues), one
PostgreSQL server, and the four services with N replicas each (SystemHarness(replicas=...)).

    with ScaleOut(tmp_path, replicas=2) as run:
        run.system.send(files, associations=4)
        run.cluster.stop_node(2); run.cluster.start_node(2)
        run.postgres.restart()

Also checks the setup is what it claims: every queue a quorum queue replicated on every node,
every queue with one consumer per replica, the Erlang distribution bound to loopback.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness.postgres import PostgresServer
from harness.processes import SERVICES
from harness.rabbit_cluster import RabbitCluster
from harness.system_harness import SendResult, SystemHarness
from harness.system_reconcile import Reconciliation, wait_reconciled
from harness.system_scenario import FAST_ENV, Batch, model_env
from harness.wait import eventually

CONSUMED_QUEUES = {"inference.images": "inference", "labeling.images": "labeling", "aggregator.events": "aggregator"}


def scale_out_env(postgres: PostgresServer) -> dict[str, str]:
    return {**FAST_ENV, **model_env(), "PT_DATABASE_URL": postgres.url, "PT_QUORUM_QUEUES": "true"}


class ScaleOut:
    def __init__(
        self,
        base_dir: Path,
        replicas: int | dict[str, int] = 2,
        cluster: RabbitCluster | None = None,
        postgres: PostgresServer | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.base_dir = Path(base_dir)
        self.replicas = replicas if isinstance(replicas, dict) else dict.fromkeys(SERVICES, replicas)
        self._own_cluster = cluster is None
        self._own_postgres = postgres is None
        self.cluster = cluster or RabbitCluster(3)
        self.postgres = postgres or PostgresServer()
        self.extra_env = env or {}
        self.system: SystemHarness | None = None

    def start(self) -> ScaleOut:
        try:
            with ThreadPoolExecutor(2) as pool:  # both take seconds of mostly waiting: at once
                started = [pool.submit(self.postgres.start)] if self._own_postgres else []
                started += [pool.submit(self.cluster.start)] if self._own_cluster else []
                for f in started:
                    f.result()
            self.system = SystemHarness(
                self.cluster,
                self.base_dir / "system",
                env={**scale_out_env(self.postgres), **self.extra_env},
                replicas=self.replicas,
            ).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.system is not None:
            self.system.stop()
        if self._own_cluster:
            self.cluster.stop()
        if self._own_postgres:
            self.postgres.stop()

    def __enter__(self) -> ScaleOut:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- what the setup claims ---------------------------------------------------------------
    def queue_facts(self) -> dict[str, tuple[str, int, int]]:
        """queue -> (type, consumers, members) in this system's vhost."""
        assert self.system is not None
        res = self.cluster.ctl("list_queues", "-p", self.system.vhost, "name", "type", "consumers",
                               "members", "--formatter", "json")  # fmt: skip
        import json

        out: dict[str, tuple[str, int, int]] = {}
        for q in json.loads(res.stdout):
            members = q.get("members") or []
            out[q["name"]] = (str(q.get("type")), int(q.get("consumers") or 0), len(members))
        return out

    def dist_listeners(self) -> dict[str, list[str]]:
        """node -> the local addresses its Erlang distribution port listens on (from `ss`)."""
        listing = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True, check=True).stdout
        out: dict[str, list[str]] = {}
        for node in self.cluster.nodes:
            out[node.nodename] = [
                parts[3].rsplit(":", 1)[0]
                for line in listing.splitlines()
                if len(parts := line.split()) >= 4 and parts[3].endswith(f":{node.dist_port}")
            ]
        return out


# ---- the fault run with replicas ---------------------------------------------------------------
def _wait_stored(system: SystemHarness, sender: threading.Thread, target: int, timeout: float = 600.0) -> int:
    from harness.system_faults import ingest_count

    eventually(lambda: not sender.is_alive() or ingest_count(system) >= target, timeout, 0.2,
               what=f"ingest to hold {target} images")  # fmt: skip
    return ingest_count(system)


def replica_faults(run: ScaleOut, batch: Batch, associations: int = 4, settle_timeout: float = 900.0,
                   resend_rounds: int = 10, log: Callable[[str], None] = print,
                   ) -> tuple[Reconciliation, SendResult, list[str]]:  # fmt: skip
    """Send the batch over `associations` (re-sending what was not acknowledged, as a PACS does);
    meanwhile kill -9 one replica of every service (and restart it), stop one RabbitMQ node (and
    start it again), restart PostgreSQL. Then reconcile. Returns the reconciliation, what the
    sender saw and a log of the faults with the stored count at each."""
    system = run.system
    assert system is not None
    n = len(batch.images)
    events: list[str] = []

    def note(msg: str) -> None:
        from harness.system_faults import ingest_count

        try:
            queued = sum(v for q, v in system.queue_depths().items() if q in CONSUMED_QUEUES)
        except Exception:  # the node answering rabbitmqctl may be the one that is down
            queued = -1
        line = f"{msg} (ingest holds {ingest_count(system)}/{n}; {queued} messages waiting for consumers)"
        events.append(line)
        log(line)

    box: dict[str, SendResult] = {}

    def pacs() -> None:
        """Send everything, then keep re-sending what was not acknowledged (a PACS's retry queue),
        so images keep arriving through every fault below."""
        total = system.send(batch.paths, associations)
        note(f"first pass: {len(total.acked)} acknowledged, {len(total.refused)} refused or not sent")
        for _round in range(resend_rounds):
            retry = [path for path, _status in total.refused]
            if not retry:
                break
            time.sleep(2.0)  # a PACS's retry delay (pacing the sender), not synchronisation
            again = system.send(retry, associations=min(associations, len(retry)))
            total.refused = again.refused
            total.acked += again.acked
            note(f"re-sent {len(retry)}: {len(again.acked)} acknowledged")
        box["sent"] = total

    sender = threading.Thread(target=pacs)
    sender.start()
    # faults while C-STOREs arrive: kill -9 first (the killed SCP's associations end; the PACS
    # re-sends their images), then one broker node down for 10 s, then a PostgreSQL restart
    _wait_stored(system, sender, int(n * 0.15))
    victims = [names[-1] for svc in SERVICES if len(names := system.replicas_of(svc)) > 1]
    for name in victims:
        system.kill9(name)
    note(f"kill -9 {', '.join(victims)}")
    with ThreadPoolExecutor(len(victims) or 1) as pool:  # each restart waits for /healthz: at once
        list(pool.map(system.restart, victims))
    note("restarted them")
    _wait_stored(system, sender, int(n * 0.35))
    node = len(run.cluster.nodes) - 1
    run.cluster.stop_node(node)
    note(f"RabbitMQ node {run.cluster.nodes[node].nodename} stopped")
    time.sleep(10)  # how long the node stays down: the fault itself, not synchronisation
    run.cluster.start_node(node)
    note("RabbitMQ node started again")
    _wait_stored(system, sender, int(n * 0.55))
    run.postgres.stop_server("fast")
    note("PostgreSQL stopped")
    time.sleep(5)  # how long PostgreSQL stays down: the fault itself, not synchronisation
    run.postgres.start_server()
    note("PostgreSQL started again")
    sender.join(timeout=3600)
    total = box["sent"]
    note(f"sender done: {len(total.acked)} acknowledged, {len(total.refused)} never acknowledged")
    rec = wait_reconciled(system, batch.acked_uids(total), timeout=settle_timeout)
    return rec, total, events
