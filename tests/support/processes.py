"""The one way tests run a child process (a service, `pneumotriage up`, Orthanc, storescp):
services/system/processes.py's ChildProcess, the class `pneumotriage up` and the system harness
use, plus the waits tests need.

    proc = TestProcess("labeling", [*CLI, "labeling"], tmp_path / "labeling.log", env=env,
                       health_url=f"http://127.0.0.1:{port}/healthz").launch()
    proc.wait_healthy(90)              # or wait_listening(port), wait_answering(url), wait_log(regex)
    proc.signal(signal.SIGTERM); assert proc.wait(60) == 0
    proc.stop()                        # SIGTERM to its process group, SIGKILL after the timeout

Every process runs in its own session (process group) with its output in its own log file.
"""

from __future__ import annotations

import re
import signal
import socket
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import httpx

from services.system.processes import ChildProcess, ServiceSpec
from tests.support.wait import eventually

CLI: tuple[str, ...] = (sys.executable, "-m", "services.cli")


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
