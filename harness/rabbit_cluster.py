"""A local RabbitMQ cluster: N nodes of Debian's rabbitmq-server on one machine.

Each node has its own node name, AMQP port, Erlang distribution port and data directory (owned by
user rabbitmq); they share one Erlang cookie (the rabbitmq user's ~/.erlang.cookie, which every
node and rabbitmqctl on this machine read). Nodes 2..N join node 1 with
`rabbitmqctl stop_app / join_cluster / start_app`. The Erlang distribution listens on 127.0.0.1
only. With `PT_QUORUM_QUEUES=true` every queue is a quorum queue replicated on all nodes, so the
system keeps working while one node of three is down.

Used by `./pt up --cluster`, the multi-replica tests and bench/scaling.py.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from harness.rabbitmq import RabbitNode

# Erlang distribution (node-to-node and CLI traffic) on loopback only.
LOOPBACK_DIST_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"


class ClusterNode(RabbitNode):
    """A RabbitNode whose Erlang distribution is bound to 127.0.0.1 and whose data survive a stop."""

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        extra = env.get("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", "")
        if "inet_dist_use_interface" not in extra:
            env["RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS"] = f"{extra} {LOOPBACK_DIST_ARGS}".strip()
        env.setdefault("ERL_EPMD_ADDRESS", "127.0.0.1")
        return env

    def shutdown(self, timeout: float = 120.0) -> None:
        """Stop the whole node (Erlang VM included); its data stay for a restart."""
        try:
            self.ctl("shutdown", timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            pass
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


class RabbitCluster:
    def __init__(self, nodes: int = 3, base_dir: Path | None = None, tag: str | None = None) -> None:
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="pt-rabbit-cluster-"))
        self.base.chmod(0o755)
        tag = tag or f"{int(time.time() * 1000) % 10_000_000}"
        self.nodes = [
            ClusterNode(base_dir=self.base / f"node{i + 1}", nodename=f"ptc{tag}n{i + 1}@localhost", keep_data=True)
            for i in range(nodes)
        ]
        self.down: set[int] = set()

    # ---- addresses (the first running node stands for the cluster) -------------------------------
    @property
    def primary(self) -> ClusterNode:
        for i, node in enumerate(self.nodes):
            if i not in self.down:
                return node
        raise RuntimeError("every node of the cluster is down")

    @property
    def port(self) -> int:
        return self.primary.port

    @property
    def url(self) -> str:
        return self.primary.url

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.primary.ctl(*args, timeout=timeout, check=check)

    def queue_depths(self, vhost: str = "/") -> dict[str, int]:
        return self.primary.queue_depths(vhost)

    # ---- life cycle ------------------------------------------------------------------------------
    def start(self, timeout: float = 180.0) -> RabbitCluster:
        # Boot every node at once (each takes seconds of CPU), then join 2..N to node 1.
        with ThreadPoolExecutor(len(self.nodes)) as pool:
            for f in [pool.submit(n.start, timeout) for n in self.nodes]:
                f.result()
        first = self.nodes[0]
        for node in self.nodes[1:]:
            node.ctl("stop_app", timeout=120)
            node.ctl("join_cluster", first.nodename, timeout=120)
            node.ctl("start_app", timeout=120)
            node.ctl("await_startup", "--timeout", "60", timeout=90)
        running = self.running_nodes()
        if len(running) != len(self.nodes):
            raise RuntimeError(f"cluster has {len(running)} running nodes, want {len(self.nodes)}: {running}")
        return self

    def running_nodes(self) -> list[str]:
        """Names of the cluster's running nodes, as node 1 (or the first one up) sees them."""
        import json

        res = self.ctl("cluster_status", "--formatter", "json", timeout=60)
        status = json.loads(res.stdout)
        return sorted(status.get("running_nodes", []))

    def stop_node(self, index: int) -> None:
        """Shut one node down (quorum queues keep their majority on the others)."""
        self.down.add(index)
        self.nodes[index].shutdown()

    def start_node(self, index: int, timeout: float = 180.0) -> None:
        """Start a stopped node again; it rejoins the cluster from its own data."""
        self.nodes[index].start(timeout)
        self.down.discard(index)

    def stop(self) -> None:
        up = [node for i, node in enumerate(self.nodes) if i not in self.down]
        if up:
            with ThreadPoolExecutor(len(up)) as pool:
                list(pool.map(lambda node: node.shutdown(), up))
        self.down = set(range(len(self.nodes)))
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> RabbitCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
