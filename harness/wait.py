"""The one way tests wait: poll a condition until it holds, or fail with what was last seen.

    rows = eventually(lambda: server.query("SELECT ..."), timeout=60, what="the tasks")
    await eventually_async(lambda: relay.backlog() == 0)        # plain or async conditions

A fixed `sleep` is never synchronisation in this suite: wait for the state the test needs (a row,
a metric, a log line, a later message handled). Sleeping stays only where the pause itself is the
thing under test (how long a fault lasts, a sender's pacing), said in a comment there.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")

Describe = str | Callable[[], str]


class NotYet(AssertionError):
    """A condition did not hold within its timeout (an AssertionError: the test failed)."""


def _message(what: Describe, timeout: float, last: Any) -> str:
    described = what() if callable(what) else what
    return f"timed out after {timeout:g}s waiting for {described or 'the condition'} (last: {last!r})"


def eventually(
    condition: Callable[[], T],
    timeout: float = 60.0,
    interval: float = 0.1,
    what: Describe = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """Call `condition` every `interval` seconds until it returns something truthy; return that.

    An exception from the condition fails at once (so a condition can check that a process is
    still alive), except those listed in `ignore` (e.g. a connection refused while a server
    starts). After `timeout` raises NotYet with `what` (a string, or a callable giving one, e.g. a
    log tail) and the last value seen.
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        try:
            last = condition()
        except ignore as exc:
            last = exc
        else:
            if last:
                return last
        if time.monotonic() >= deadline:
            raise NotYet(_message(what, timeout, last))
        time.sleep(interval)


async def eventually_async(
    condition: Callable[[], Awaitable[T] | T],
    timeout: float = 60.0,
    interval: float = 0.1,
    what: Describe = "",
    ignore: tuple[type[BaseException], ...] = (),
) -> T:
    """`eventually` inside an event loop: the condition may be a coroutine function; the loop keeps
    running between polls (the service under test lives in it)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    last: Any = None
    while True:
        try:
            value = condition()
            last = await value if inspect.isawaitable(value) else value
        except ignore as exc:
            last = exc
        else:
            if last:
                return last  # type: ignore[no-any-return]
        if loop.time() >= deadline:
            raise NotYet(_message(what, timeout, last))
        await asyncio.sleep(interval)
