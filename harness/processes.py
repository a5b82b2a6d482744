"""Child processes of the local system and of the tests: one service (or peer) each, in its own
session (process group), with its own log, health and memory probes.

`ChildProcess` is what `./pt up` (through supervisor.py) and the system harness (system_harness.py)
start services with, so a service is started the same way in both. `TestProcess` is the one way
tests and benchmarks run a child process (a service, `./pt up`, Orthanc, storescp): a ChildProcess
plus the waits they need.

    proc = TestProcess("labeling", [*CLI, "labeling"], tmp_path / "labeling.log", env=env,
                       health_url=f"http://127.0.0.1:{port}/healthz").launch()
    proc.wait_healthy(90)              # or wait_listening(port), wait_answering(url), wait_log(regex)
    proc.signal(signal.SIGTERM); assert proc.wait(60) == 0
    proc.stop()                        # SIGTERM to its process group, SIGKILL after the timeout
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from harness.wait import eventually

# The four services, in start order (consumers before the producer so nothing waits in a queue
# for a consumer that is still booting; the broker keeps it anyway) and their default HTTP ports.
SERVICES: tuple[str, ...] = ("aggregator", "labeling", "inference", "ingest")
DEFAULT_HTTP_PORTS: dict[str, int] = {"ingest": 8001, "inference": 8002, "labeling": 8003, "aggregator": 8004}


def service_argv(service: str) -> list[str]:
    """`pneumotriage <service>` run with this interpreter (works without the console script on PATH)."""
    return [sys.executable, "-m", "services.cli", service]


@dataclass
class ServiceSpec:
    name: str
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    health_url: str | None = None
    cwd: Path | None = None
    # names removed from the inherited environment (e.g. a test's PT_AMQP_URL a child must not see)
    unset_env: tuple[str, ...] = ()


LineSink = Callable[[str, str], None]


class ChildProcess:
    """One service process: output to a log file (and optionally to a sink, line by line)."""

    def __init__(self, spec: ServiceSpec, log_path: Path, sink: LineSink | None = None) -> None:
        self.spec = spec
        self.log_path = log_path
        self.sink = sink
        self.process: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0
        self.starts = 0
        self._reader: threading.Thread | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in {**os.environ, **self.spec.env}.items() if k not in self.spec.unset_env}
        log = open(self.log_path, "ab")  # handed to the child / the reader thread
        self.process = subprocess.Popen(
            self.spec.argv,
            env=env,
            cwd=self.spec.cwd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if self.sink else log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor, which stops us in order
        )
        self.started_at = time.monotonic()
        self.starts += 1
        if self.sink is not None:
            self._reader = threading.Thread(target=self._pump, args=(self.process, log), daemon=True)
            self._reader.start()
        else:
            log.close()

    def _pump(self, process: subprocess.Popen[bytes], log: object) -> None:
        assert process.stdout is not None and self.sink is not None
        with log:  # type: ignore[attr-defined]
            for raw in process.stdout:
                log.write(raw)  # type: ignore[attr-defined]
                log.flush()  # type: ignore[attr-defined]
                self.sink(self.name, raw.decode("utf-8", "replace").rstrip("\n"))

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    def healthy(self, timeout: float = 3.0) -> bool:
        if not self.spec.health_url or not self.alive():
            return False
        try:
            return httpx.get(self.spec.health_url, timeout=timeout).status_code == 200
        except httpx.HTTPError:
            return False

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited with {self.returncode()} before it was healthy:\n{self.tail()}")
            if self.healthy():
                return
            time.sleep(0.3)
        raise TimeoutError(f"{self.name} not healthy after {timeout}s ({self.spec.health_url}):\n{self.tail()}")

    def terminate(self, timeout: float = 30.0) -> int | None:
        """SIGTERM (graceful), then SIGKILL after `timeout` seconds; returns the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._join()
        return self.process.poll()

    def kill9(self) -> None:
        """kill -9 the service (and anything it started in its session)."""
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait(timeout=30)
        self._join()

    def _join(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5)
            self._reader = None

    def rss_bytes(self) -> int | None:
        """Resident memory of the service process (Linux /proc), None when not running."""
        if not self.alive():
            return None
        return rss_of(self.pid)  # type: ignore[arg-type]

    def tail(self, n_chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n_chars:]
        except OSError:
            return ""


def rss_of(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (parent pid, user + system CPU seconds) of every process, from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    stats: dict[int, tuple[int, float]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            stats[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick)
    return stats


def children_of(pid: int) -> list[int]:
    """The processes whose parent is `pid` (Linux /proc)."""
    return [p for p, (ppid, _) in _proc_stats().items() if ppid == pid]


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds (user + system) used so far by a process and its live descendants (Linux /proc);
    NaN when the process is gone."""
    stats = _proc_stats()
    if pid not in stats:
        return float("nan")
    children: dict[int, list[int]] = {}
    for p, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(p)
    total, frontier = 0.0, [pid]
    while frontier:
        current = frontier.pop()
        total += stats[current][1]
        frontier.extend(children.get(current, ()))
    return total


# -- tests' and benchmarks' child processes --------------------------------------------------------
CLI: tuple[str, ...] = (sys.executable, "-m", "services.cli")
# `./pt up` / `./pt demo` (harness/cli.py) run from any directory: the harness is not installed with
# the package, so the checkout goes on PYTHONPATH.
HARNESS_CLI: tuple[str, ...] = (sys.executable, "-m", "harness")
HARNESS_ENV: dict[str, str] = {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}


class TestProcess(ChildProcess):
    __test__ = False  # not a pytest test class

    def __init__(
        self,
        name: str,
        argv: Iterable[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        health_url: str | None = None,
        unset_env: Iterable[str] = (),
    ) -> None:
        """`env` is added to this process's environment; `unset_env` names are removed from it."""
        spec = ServiceSpec(name, list(argv), dict(env or {}), health_url, cwd, tuple(unset_env))
        super().__init__(spec, Path(log_path))

    def launch(self) -> TestProcess:
        self.start()
        return self

    # -- waits: each fails at once (with the log tail) when the process exits first ------------
    def _check_alive(self, waiting_for: str) -> None:
        if not self.alive():
            raise RuntimeError(f"{self.name} exited with {self.returncode()} before {waiting_for}:\n{self.tail()}")

    def wait_listening(self, port: int, timeout: float = 60.0, host: str = "127.0.0.1") -> None:
        """Until something accepts TCP connections on host:port."""

        def listening() -> bool:
            self._check_alive(f"listening on {port}")
            with socket.create_connection((host, port), timeout=1):
                return True

        eventually(listening, timeout, what=lambda: f"{self.name} on {host}:{port}:\n{self.tail()}", ignore=(OSError,))

    def wait_answering(self, url: str, timeout: float = 90.0) -> httpx.Response:
        """Until `url` answers HTTP at all (any status: a 503 health without a broker is serving)."""

        def answer() -> httpx.Response:
            self._check_alive(f"answering {url}")
            return httpx.get(url, timeout=5)

        return eventually(answer, timeout, 0.3, what=lambda: f"{url}:\n{self.tail()}", ignore=(httpx.HTTPError,))

    def wait_log(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        """Until the process's log has a line matching `pattern`; returns the first match."""

        def found() -> re.Match[str] | None:
            m = re.search(pattern, self.log_text())
            if m is None:
                self._check_alive(f"logging {pattern!r}")
            return m

        return eventually(found, timeout, 0.3, what=lambda: f"{pattern!r} in {self.log_path}:\n{self.tail()}")

    # -- signals and exit ------------------------------------------------------------------------
    def signal(self, sig: int = signal.SIGTERM) -> None:
        """Send `sig` to the process alone (not its group): what a user's kill or Ctrl-C would do."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        """The exit code, once it exits (subprocess.TimeoutExpired after `timeout`)."""
        assert self.process is not None
        code = self.process.wait(timeout=timeout)
        self._join()
        return code

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM to the process group, SIGKILL after `timeout`; the exit code (None if never started)."""
        return self.terminate(timeout)

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def __enter__(self) -> TestProcess:
        return self.launch()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
