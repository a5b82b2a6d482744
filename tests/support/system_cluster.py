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
from pathlib import Path

from services.system.postgres import PostgresServer
from services.system.processes import SERVICES
from services.system.rabbit_cluster import RabbitCluster
from tests.support.system_harness import SystemHarness
from tests.support.system_scenario import FAST_ENV, model_env

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
            if self._own_postgres:
                self.postgres.start()
            if self._own_cluster:
                self.cluster.start()
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
