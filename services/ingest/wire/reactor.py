"""Event-driven reactors for pynetdicom's two threads per association (fast path only)."""

from __future__ import annotations

import contextlib
import queue
import select
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

from pynetdicom.dul import DULServiceProvider

# pynetdicom's two threads per association poll: the DUL thread sleeps 1 ms whenever it found nothing
# to do, the association thread sleeps 1 ms on every loop. Measured: ~3.4 % of a core per idle
# association, and up to a millisecond per hand-over. For our associations these 1 ms sleeps wait
# instead until there is work (a queue item, data on the socket), at most REACTOR_WAIT_S, so timers
# and thread exits are still noticed.
REACTOR_WAIT_S = 0.01
POLL_S = 0.001  # the sleep both pynetdicom reactors use (other sleeps are left alone)


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class Waker:
    """Wakes one association's reactor threads when there is work for them."""

    def __init__(self, assoc: Any) -> None:
        self.user = threading.Event()  # the association thread: something in one of its queues
        self._r, self._w = socket.socketpair()  # the DUL thread: a primitive to send or an event to run
        self._r.setblocking(False)
        self._w.setblocking(False)
        dul = assoc.dul
        for owner, name, wake in (
            (dul, "to_user_queue", self.user.set),  # A-ASSOCIATE, A-RELEASE, A-ABORT indications
            (assoc.dimse, "msg_queue", self.user.set),  # complete DIMSE messages (the DUL thread decodes)
            (dul, "to_provider_queue", self.wake_provider),  # primitives to send
            (dul, "event_queue", self.wake_provider),  # state machine events, e.g. Evt17 from a close
        ):
            old: queue.Queue[Any] = getattr(owner, name)
            new = _WakingQueue(wake)
            new.queue.extend(old.queue)  # (Evt5 is already there: the connection was made)
            setattr(owner, name, new)
        assoc._pt_waker = self
        dul._pt_waker = self

    def wake_provider(self) -> None:
        with contextlib.suppress(OSError):
            self._w.send(b"\x00")

    def wait_provider(self, dul: Any) -> None:
        sock = getattr(dul.socket, "socket", None) if dul.socket is not None else None
        waits = [self._r] if sock is None or sock.fileno() < 0 else [sock, self._r]
        try:
            ready, _, _ = select.select(waits, [], [], REACTOR_WAIT_S)
        except (OSError, ValueError):
            time.sleep(POLL_S)
            return
        if self._r in ready:
            with contextlib.suppress(OSError):
                while self._r.recv(4096):
                    pass

    def wait_user(self) -> None:
        if self.user.wait(REACTOR_WAIT_S):
            self.user.clear()

    def close(self) -> None:
        self._r.close()
        self._w.close()


class _ReactorTime:
    """Stands in for the `time` module inside pynetdicom.dul and pynetdicom.association."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        waker: Waker | None = getattr(thread, "_pt_waker", None)
        if waker is None or seconds != POLL_S:
            self._real.sleep(seconds)
        elif isinstance(thread, DULServiceProvider):
            waker.wait_provider(thread)
        else:
            waker.wait_user()


def install_reactor_wakeups() -> None:
    """Route pynetdicom's reactor polls through _ReactorTime (idempotent; other associations in the
    process, which have no Waker, keep their plain sleeps)."""
    import pynetdicom.association
    import pynetdicom.dul

    for module in (pynetdicom.dul, pynetdicom.association):
        if not isinstance(module.time, _ReactorTime):
            module.time = _ReactorTime(module.time)  # type: ignore[assignment]
