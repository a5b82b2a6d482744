"""A small supervisor for `./pt up`: start the services, restart a crashed one with
exponential back-off, stop them all (in reverse order) on request.

honcho's Manager (installed) prints nicely but stops every process as soon as one exits; the
system should instead survive a crashed service, so we keep honcho's Printer for the familiar
foreman-style output and restart children ourselves.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from harness.processes import ChildProcess

log = logging.getLogger(__name__)


@dataclass
class RestartPolicy:
    initial_backoff_s: float = 1.0
    max_backoff_s: float = 30.0
    # A child that stayed up this long is considered healthy again: its back-off resets.
    stable_after_s: float = 60.0


class Supervisor:
    def __init__(
        self,
        children: list[ChildProcess],
        policy: RestartPolicy | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> None:
        self.children = children
        self.policy = policy or RestartPolicy()
        self.notify = notify or (lambda msg: log.info(msg))
        self._backoff: dict[str, float] = {c.name: self.policy.initial_backoff_s for c in children}
        self._restart_at: dict[str, float] = {}
        self.restarts: dict[str, int] = {c.name: 0 for c in children}
        self._stopping = threading.Event()

    def start_all(self, wait_healthy: bool = True, timeout: float = 180.0) -> None:
        for child in self.children:
            child.start()
            self.notify(f"started {child.name} (pid {child.pid})")
        if wait_healthy:
            for child in self.children:
                child.wait_healthy(timeout)
                self.notify(f"{child.name} is healthy ({child.spec.health_url})")

    def poll_once(self, now: float | None = None) -> None:
        """Restart children that exited (after their back-off); call this periodically."""
        now = time.monotonic() if now is None else now
        for child in self.children:
            if self._stopping.is_set():
                return
            if child.alive():
                if now - child.started_at >= self.policy.stable_after_s:
                    self._backoff[child.name] = self.policy.initial_backoff_s
                continue
            due = self._restart_at.get(child.name)
            if due is None:
                delay = self._backoff[child.name]
                self._restart_at[child.name] = now + delay
                self._backoff[child.name] = min(delay * 2, self.policy.max_backoff_s)
                self.notify(f"{child.name} exited with {child.returncode()}; restarting in {delay:.0f}s")
            elif now >= due:
                del self._restart_at[child.name]
                child.start()
                self.restarts[child.name] += 1
                self.notify(f"restarted {child.name} (pid {child.pid}, restart #{self.restarts[child.name]})")

    def run_until(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        while not stop.wait(interval_s):
            self.poll_once()

    def stop_all(self, timeout_per_child: float = 30.0) -> None:
        """Stop children in reverse start order (the producer first, so consumers drain)."""
        self._stopping.set()
        for child in reversed(self.children):
            if child.alive():
                self.notify(f"stopping {child.name}")
                code = child.terminate(timeout_per_child)
                self.notify(f"{child.name} stopped (exit {code})")
