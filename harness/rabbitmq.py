"""A throwaway RabbitMQ node (Debian's rabbitmq-server) on loopback with its own data directory.

Used by `./pt up` when no PT_AMQP_URL is given, and by the test suite. The Debian start
script drops privileges to the `rabbitmq` user, so the directories are chowned to it when we run
as root (see ../shared/RUNTIME-NOTES.md).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from services.core.net import free_port

LOOPBACK_DIST_ARGS = "-kernel inet_dist_use_interface {127,0,0,1}"


class RabbitNode:
    def __init__(
        self,
        base_dir: Path | None = None,
        port: int | None = None,
        management_port: int | None = None,
        nodename: str | None = None,
        keep_data: bool = False,
    ):
        """A node on loopback. `nodename` + `keep_data` give a node whose queues survive a restart
        (`./pt up` uses <data_dir>/rabbitmq); by default the node is throwaway."""
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="pt-rabbit-"))
        self.port = port or free_port()
        self.dist_port = free_port()
        self.management_port = management_port
        self.nodename = nodename or f"pt{os.getpid()}x{self.port}@localhost"
        self.keep_data = keep_data
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(
            RABBITMQ_NODENAME=self.nodename,
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_MNESIA_BASE=str(self.base / "mnesia"),
            RABBITMQ_LOG_BASE=str(self.base / "log"),
            RABBITMQ_PID_FILE=str(self.base / "pid"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(self.base / "enabled_plugins"),
            RABBITMQ_CONFIG_FILE=str(self.base / "rabbitmq"),
            # Erlang distribution (inter-node and CLI traffic: whoever reaches it with the cookie runs
            # code on the node) and epmd listen on loopback only. epmd is shared by every node on the
            # machine: when one is already running, it keeps the address it was started with.
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=" ".join(
                a for a in (env.get("RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS", ""), LOOPBACK_DIST_ARGS) if a
            ),
        )
        return env

    def start(self, timeout: float = 60.0) -> RabbitNode:
        if shutil.which("rabbitmq-server") is None:
            raise RuntimeError("rabbitmq-server is not installed (apt-get install -y rabbitmq-server)")
        (self.base / "mnesia").mkdir(parents=True, exist_ok=True)
        (self.base / "log").mkdir(parents=True, exist_ok=True)
        plugins = "[rabbitmq_management]." if self.management_port else "[]."
        (self.base / "enabled_plugins").write_text(plugins + "\n")
        conf = ["loopback_users = none", "log.console = false"]
        if self.management_port:
            conf += [f"management.tcp.port = {self.management_port}", "management.tcp.ip = 127.0.0.1"]
        (self.base / "rabbitmq.conf").write_text("\n".join(conf) + "\n")
        if os.geteuid() == 0:
            subprocess.run(["chown", "-R", "rabbitmq:rabbitmq", str(self.base)], check=True)
        self.process = subprocess.Popen(
            ["rabbitmq-server"],
            env=self.env,
            stdout=open(self.base / "out.log", "ab"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.wait_ready(timeout)
        return self

    def ctl(self, *args: str, timeout: float = 60.0, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["rabbitmqctl", "-q", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=check
        )

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"rabbitmq-server exited: {(self.base / 'out.log').read_text()[-2000:]}")
            try:
                res = self.ctl("await_startup", "--timeout", "5", timeout=15, check=False)
                if res.returncode == 0:
                    return
                last = res.stderr
            except subprocess.TimeoutExpired:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"RabbitMQ did not start in {timeout}s: {last}")

    def stop_app(self) -> None:
        """Take the broker down (connections drop, ports close) while the node stays up."""
        self.ctl("stop_app")

    def start_app(self) -> None:
        self.ctl("start_app")
        self.ctl("await_startup", "--timeout", "30", timeout=45)

    def queue_depths(self, vhost: str = "/") -> dict[str, int]:
        res = self.ctl("list_queues", "-p", vhost, "name", "messages", "--no-table-headers")
        out: dict[str, int] = {}
        for line in res.stdout.splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                out[parts[0]] = int(parts[1])
        return out

    def stop(self) -> None:
        try:
            self.ctl("shutdown", timeout=60, check=False)
        except subprocess.TimeoutExpired:
            pass
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
        # epmd may keep running; harmless, and shared by other nodes on the machine.
        if not self.keep_data:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> RabbitNode:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
