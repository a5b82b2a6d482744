"""Work around a client deadlock: a connection that closes while RabbitMQ blocks it never recovers.

RabbitMQ blocks a publishing connection during a memory or disk alarm (`connection.blocked`).
aiormq 7.2.4 clears the connection's "unblocked" event then, and sets it again only when
`connection.unblocked` arrives. If the broker restarts (or the connection drops) while it is
blocked, that frame never comes: the event stays cleared on the dead connection, and
`aiormq.Connection.ready()` never returns.

aio-pika 10.2.1's RobustChannel reacts to the close by reopening itself at once
(`_on_close` -> `restore` -> `_open` -> `transport.ready()` on the dead connection), holding the
channel's restore lock while it waits. When the robust connection has reconnected, it restores
each channel through the same lock, and waits for ever too: the connection is up, every channel
on it stays closed. Measured (RabbitMQ memory alarm, `rabbitmqctl stop_app`, `start_app`):
publishes failed with ChannelInvalidStateError for the whole 50 s watched, and consumers on the
same connection stopped. The same restart without the alarm recovers in about 0.2 s.

The fix: when an aiormq connection closes, set its "unblocked" event. A waiter in `ready()` then
wakes, fails on the closed connection as it would without the alarm, and lets go of the lock,
and the reconnect restores the channels. Nothing else changes: a live, blocked connection still
holds its publishes until RabbitMQ unblocks it.

aiormq is pinned (pyproject.toml) because this reaches one private attribute; `install()` fails
loudly if it is gone, and tests/fault/test_broker_alarm_restart.py shows the recovery for real.
"""

from __future__ import annotations

import functools
from importlib.metadata import version
from typing import Any

import aiormq

_UNBLOCKED = "_Connection__connection_unblocked"  # aiormq.connection.Connection.__connection_unblocked


def install() -> None:
    """Patch aiormq.Connection._on_close once per process (idempotent)."""
    original = aiormq.Connection._on_close
    if getattr(original, "_pt_sets_unblocked", False):
        return
    if _UNBLOCKED not in aiormq.Connection.__init__.__code__.co_names:
        raise RuntimeError(f"aiormq {version('aiormq')} has no {_UNBLOCKED}: re-check {__name__}")

    @functools.wraps(original)
    async def _on_close(self: aiormq.Connection, *args: Any, **kwargs: Any) -> None:
        try:
            await original(self, *args, **kwargs)
        finally:
            getattr(self, _UNBLOCKED).set()  # wake ready() waiters: they fail on the closed connection

    _on_close._pt_sets_unblocked = True  # type: ignore[attr-defined]
    aiormq.Connection._on_close = _on_close  # type: ignore[method-assign]
