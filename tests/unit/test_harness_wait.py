"""The suite's one wait (harness/wait.py): returns the first truthy value, fails with what it
waited for and the last value seen, fails at once on an unexpected error."""

from __future__ import annotations

import itertools

import pytest

from harness.wait import NotYet, eventually, eventually_async


def test_returns_the_first_truthy_value() -> None:
    counter = itertools.count()
    assert eventually(lambda: (n := next(counter)) >= 3 and n, 5, 0.001) == 3


def test_times_out_with_what_and_the_last_value() -> None:
    with pytest.raises(NotYet, match=r"waiting for the answer \(last: 0\)"):
        eventually(lambda: 0, 0.05, 0.01, what=lambda: "the answer")
    assert issubclass(NotYet, AssertionError)  # a failed test, not an error in the harness


def test_an_error_fails_at_once_unless_ignored() -> None:
    calls = itertools.count()

    def flaky() -> bool:
        if next(calls) < 2:
            raise ConnectionError("not yet listening")
        return True

    with pytest.raises(ConnectionError):
        eventually(flaky, 5, 0.001)
    calls = itertools.count()
    assert eventually(flaky, 5, 0.001, ignore=(ConnectionError,)) is True


async def test_async_accepts_plain_and_coroutine_conditions() -> None:
    counter = itertools.count()

    async def reached() -> int | None:
        n = next(counter)
        return n if n >= 2 else None

    assert await eventually_async(reached, 5, 0.001) == 2
    assert await eventually_async(lambda: "ready", 1) == "ready"
    with pytest.raises(NotYet):
        await eventually_async(lambda: None, 0.05, 0.01)
