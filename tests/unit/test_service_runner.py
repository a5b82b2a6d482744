"""The service runner's life cycle (services/core/runner.py) with small in-test components, in this
event loop: the first failure stops the service with exit 1 whatever the others do, a stop is exit 0,
the service's graceful stop runs before what remains is cancelled, and the stop is bounded.
The same runner in real processes: tests/integration/test_service_runner_process.py."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from services.core.runner import Components, ServiceRunner

BOUND_S = 10.0  # every run here must end well within this: none of them is told to stop otherwise


def runner(**kwargs: float) -> ServiceRunner:
    return ServiceRunner("test", signals=(), **kwargs)  # type: ignore[arg-type]


async def forever(events: list[str], name: str) -> None:
    try:
        await asyncio.Event().wait()
    except asyncio.CancelledError:
        events.append(f"{name} cancelled")
        raise


async def fail_after(seconds: float, error: Exception) -> None:
    await asyncio.sleep(seconds)
    raise error


async def test_first_component_failure_stops_everything_with_exit_1() -> None:
    events: list[str] = []
    r = runner()

    async def start(run: ServiceRunner) -> Callable[[], Awaitable[None]]:
        run.spawn("steady", forever(events, "steady"))
        run.spawn("broken", fail_after(0.2, RuntimeError("disk gone")))
        run.spawn("late", fail_after(0.6, RuntimeError("second failure")))

        async def stop() -> None:
            events.append("service stop")

        return stop

    t0 = time.monotonic()
    code = await asyncio.wait_for(r.run(start), BOUND_S)
    assert code == 1
    assert time.monotonic() - t0 < 5
    # the graceful stop runs first, then what still runs is cancelled (the late failure included)
    assert events == ["service stop", "steady cancelled"]
    assert r.components.failure is not None
    assert r.components.failure.component == "broken"
    assert "disk gone" in repr(r.components.failure.error)
    assert all(t.done() for t in r.components.tasks)


async def test_a_component_that_returns_before_the_stop_is_a_failure() -> None:
    r = runner()

    async def quits() -> None:
        await asyncio.sleep(0.1)

    async def start(run: ServiceRunner) -> None:
        run.spawn("quits", quits())

    assert await asyncio.wait_for(r.run(start), BOUND_S) == 1
    assert r.components.failure is not None and r.components.failure.error is None


async def test_stop_is_exit_0_and_components_may_end_on_it() -> None:
    events: list[str] = []
    r = runner()

    async def until_stopped(stop: asyncio.Event) -> None:
        await stop.wait()
        events.append("loop ended on stop")

    async def start(run: ServiceRunner) -> Callable[[], Awaitable[None]]:
        run.spawn("loop", until_stopped(run.stop))
        run.spawn("steady", forever(events, "steady"))
        asyncio.get_running_loop().call_later(0.2, run.stop.set)  # what SIGTERM does

        async def stop() -> None:
            await asyncio.sleep(0)
            events.append("service stop")

        return stop

    assert await asyncio.wait_for(r.run(start), BOUND_S) == 0
    assert events == ["loop ended on stop", "service stop", "steady cancelled"]
    assert r.components.failure is None


async def test_a_failure_in_a_watched_service_group_stops_the_process() -> None:
    """Ingest and labeling keep their components in their own group (tests run them in-process);
    the runner watches it."""
    events: list[str] = []
    service_stop = asyncio.Event()
    group = Components(service_stop)
    r = runner()

    async def start(run: ServiceRunner) -> Callable[[], Awaitable[None]]:
        run.watch(group)
        group.spawn("relay", forever(events, "relay"))
        group.spawn("http", fail_after(0.1, OSError("address already in use")))

        async def stop() -> None:
            service_stop.set()
            await group.cancel()
            events.append("service closed")

        return stop

    assert await asyncio.wait_for(r.run(start), BOUND_S) == 1
    assert events == ["relay cancelled", "service closed"]
    assert group.failure is not None and group.failure.component == "http"


async def test_start_up_failure_is_exit_1_and_cancels_what_started() -> None:
    events: list[str] = []
    r = runner()

    async def start(run: ServiceRunner) -> None:
        run.spawn("steady", forever(events, "steady"))
        await asyncio.sleep(0.05)  # it runs
        raise RuntimeError("PT_SECRET_KEY is refused")

    assert await asyncio.wait_for(r.run(start), BOUND_S) == 1
    assert events == ["steady cancelled"]


async def test_a_hanging_graceful_stop_is_bounded() -> None:
    events: list[str] = []
    r = runner(stop_timeout_s=0.5)

    async def start(run: ServiceRunner) -> Callable[[], Awaitable[None]]:
        run.spawn("steady", forever(events, "steady"))
        run.stop.set()

        async def stop() -> None:
            await asyncio.Event().wait()  # a flush that never ends

        return stop

    t0 = time.monotonic()
    assert await asyncio.wait_for(r.run(start), BOUND_S) == 0
    assert 0.4 < time.monotonic() - t0 < 5
    assert events == ["steady cancelled"]


async def test_a_component_ending_after_the_stop_is_not_a_failure() -> None:
    group = Components()
    task = group.spawn("quick", asyncio.sleep(0))
    group.stopping.set()
    await task
    await asyncio.sleep(0)  # done callbacks run on the next loop turn
    assert group.failure is None and not group.failed.is_set()


@pytest.mark.parametrize("error", [RuntimeError("boom"), None])
async def test_components_record_only_the_first_failure(error: Exception | None) -> None:
    group = Components()

    async def end(delay: float, exc: Exception | None) -> None:
        await asyncio.sleep(delay)
        if exc is not None:
            raise exc

    group.spawn("first", end(0.05, error))
    group.spawn("second", end(0.1, ValueError("later")))
    await asyncio.wait_for(group.failed.wait(), BOUND_S)
    await asyncio.sleep(0.2)
    assert group.failure is not None and group.failure.component == "first"
    assert group.failure.error is error
    await group.cancel()


FROZEN_PROBE = """
import asyncio, gc, json, time
from services.core.runner import ServiceRunner

def full_gc_ms():
    t0 = time.perf_counter(); gc.collect(); return (time.perf_counter() - t0) * 1000

async def start(run):
    run.kept = [{"i": i, "l": [i]} for i in range(150_000)]  # start-up state, as a service builds
    before = min(full_gc_ms() for _ in range(3))

    async def report():
        await asyncio.sleep(0)
        after = min(full_gc_ms() for _ in range(3))
        print(json.dumps({"before_ms": before, "after_ms": after, "frozen": gc.get_freeze_count()}), flush=True)
        run.stop.set()

    run.spawn("report", report())
    return None

ServiceRunner("probe", signals=()).main(start)
"""


def test_the_process_entry_point_freezes_the_start_up_heap() -> None:
    """A full collection stops every thread; after start-up it no longer walks what start built."""
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run(
        [sys.executable, "-c", FROZEN_PROBE], cwd=root, capture_output=True, text=True, timeout=120, check=True
    )
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["frozen"] >= 300_000  # the 150,000 dicts and their lists, at least
    assert r["after_ms"] < r["before_ms"] / 3, r


async def test_in_process_runs_leave_the_callers_heap_alone() -> None:
    frozen = gc.get_freeze_count()

    async def start(run: ServiceRunner) -> None:
        run.stop.set()

    assert await asyncio.wait_for(runner().run(start), BOUND_S) == 0
    assert gc.get_freeze_count() == frozen


class FakeService:
    """The `Service` shape (services.core.runner.Service): its own task group, start(migrate), stop()."""

    def __init__(self, events: list[str], start_error: Exception | None = None) -> None:
        self.events = events
        self.start_error = start_error
        self._stop = asyncio.Event()
        self.components = Components(self._stop)

    async def start(self, migrate: bool = True) -> FakeService:
        self.events.append(f"start migrate={migrate}")
        self.components.spawn("steady", forever(self.events, "steady"))
        if self.start_error is not None:
            await asyncio.sleep(0.05)  # it runs
            raise self.start_error
        return self

    async def stop(self) -> None:
        self._stop.set()
        self.events.append("service stop")
        await self.components.cancel()


async def test_start_service_starts_watches_and_stops_the_service_object() -> None:
    events: list[str] = []
    service = FakeService(events)
    r = runner()

    async def start(run: ServiceRunner) -> Callable[[], Awaitable[None]]:
        stop = await run.start_service(service)
        service.components.spawn("http", fail_after(0.1, OSError("address already in use")))
        return stop

    assert await asyncio.wait_for(r.run(start), BOUND_S) == 1  # its own group is watched
    assert events == ["start migrate=False", "service stop", "steady cancelled"]
    assert service.components.failure is not None and service.components.failure.component == "http"


async def test_start_service_stops_what_started_when_the_start_fails() -> None:
    events: list[str] = []
    service = FakeService(events, start_error=RuntimeError("PT_SECRET_KEY is refused"))

    async def start(run: ServiceRunner) -> Callable[[], Awaitable[None]]:
        return await run.start_service(service)

    assert await asyncio.wait_for(runner().run(start), BOUND_S) == 1
    assert events == ["start migrate=False", "service stop", "steady cancelled"]


def test_every_service_object_has_the_same_shape() -> None:
    """IngestService, InferenceService, LabelingService, AggregatorService: `components` (a Components
    task group made in __init__), `async start(migrate=True)`, `async stop()`; each app's start(runner)
    hands it to `runner.start_service`."""
    import inspect

    from services.aggregator.app import AggregatorService
    from services.inference.app import InferenceService
    from services.ingest.app import IngestService
    from services.labeling.app import LabelingService

    for cls in (IngestService, InferenceService, LabelingService, AggregatorService):
        assert inspect.iscoroutinefunction(cls.start) and inspect.iscoroutinefunction(cls.stop), cls
        assert inspect.signature(cls.start).parameters["migrate"].default is True, cls
        assert list(inspect.signature(cls.stop).parameters) == ["self"], cls
        assert "self.components = Components(" in inspect.getsource(cls.__init__), cls
        app = inspect.getsource(inspect.getmodule(cls))  # type: ignore[arg-type]
        assert "await runner.start_service(" in app, cls
