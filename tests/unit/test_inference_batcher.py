"""The micro-batcher on a real onnxruntime session: batches bounded by max_batch, and a runtime that
is not available yet is retried in-process until it is (nothing fails meanwhile)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import REGISTRY

from harness.wait import eventually_async
from services.inference.runtime import ModelRepository, OnnxRuntime
from services.inference.worker import MicroBatcher
from tests.support.inference_model import build_tiny_onnx, make_repository


@pytest.fixture(scope="module")
def tiny_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batcher")
    return make_repository(root / "models", build_tiny_onnx(root / "tiny.onnx", 64), input_size=64)


def _unavailable() -> float:
    """Runs that found the runtime unavailable so far (each one is a retry of the batch)."""
    return REGISTRY.get_sample_value("pt_inference_errors_total", {"kind": "runtime_unavailable"}) or 0.0


def _inputs(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(1)
    return [rng.standard_normal((1, 64, 64)).astype(np.float32) for _ in range(n)]


async def test_batches_respect_max_batch_and_results_match_single_runs(tiny_repository: Path) -> None:
    runtime = OnnxRuntime(ModelRepository(tiny_repository, "pneumonia"), threads=1)
    await runtime.start()
    batcher = MicroBatcher(runtime, max_batch=4, max_wait_ms=50)
    batcher.start()
    try:
        inputs = _inputs(10)
        items = await asyncio.gather(*(batcher.submit(x) for x in inputs))
        assert max(i.batch_size for i in items) == 4
        assert sum(1.0 / i.batch_size for i in items) == pytest.approx(3)  # 4 + 4 + 2
        single = runtime.run_sync(np.stack(inputs))
        assert np.max(np.abs(np.array([i.logit for i in items]) - single.logits)) < 1e-5
        assert all(i.model_version == "1" and i.cam.shape == single.cams.shape[1:] for i in items)
    finally:
        await batcher.close()
        await runtime.close()


async def test_unavailable_runtime_is_retried_until_it_answers(tiny_repository: Path) -> None:
    runtime = OnnxRuntime(ModelRepository(tiny_repository, "pneumonia"), threads=1)  # not started yet
    batcher = MicroBatcher(runtime, max_batch=8, max_wait_ms=5, max_backoff_s=0.2)
    batcher.start()
    before = _unavailable()
    try:
        pending = [asyncio.ensure_future(batcher.submit(x)) for x in _inputs(3)]
        await eventually_async(lambda: _unavailable() - before >= 2, 10, what="two failed runs")  # retried twice
        assert not any(p.done() for p in pending)
        assert batcher.available is False
        await runtime.start()
        items = await asyncio.wait_for(asyncio.gather(*pending), 10)
        assert len(items) == 3 and batcher.available
        assert _unavailable() - before >= 2
    finally:
        await batcher.close()
        await runtime.close()


async def test_cancelled_waiters_stop_the_retry(tiny_repository: Path) -> None:
    runtime = OnnxRuntime(ModelRepository(tiny_repository, "pneumonia"), threads=1)
    batcher = MicroBatcher(runtime, max_batch=2, max_wait_ms=1, max_backoff_s=0.05)
    batcher.start()
    try:
        before = _unavailable()
        pending = [asyncio.ensure_future(batcher.submit(x)) for x in _inputs(2)]
        await eventually_async(lambda: _unavailable() > before, 10, 0.02, what="a failed run (the retry loop runs)")
        for p in pending:
            p.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        # the retry loop gives up: nobody is waiting any more
        await eventually_async(lambda: not batcher._inflight, 5, 0.02, what="the retry loop to give up")
    finally:
        await batcher.close()


async def test_a_fresh_image_joins_the_next_batch_ahead_of_waiting_backfill(tiny_repository: Path) -> None:
    """Lanes (issue 24): backfill tensors already waiting in the batcher do not go ahead of a fresh one."""
    runtime = OnnxRuntime(ModelRepository(tiny_repository, "pneumonia"), threads=1)
    await runtime.start()
    batcher = MicroBatcher(runtime, max_batch=4, max_wait_ms=0)
    done: list[str] = []
    try:
        tasks = []
        for i, x in enumerate(_inputs(13)):
            lane, tag = ("fresh", "fresh") if i == 12 else ("backfill", f"b{i}")
            task = asyncio.ensure_future(batcher.submit(x, lane))
            task.add_done_callback(lambda _t, tag=tag: done.append(tag))
            tasks.append(task)
        await eventually_async(lambda: batcher._queue.qsize() == 13, 5, what="all 13 queued")
        batcher.start()  # the fresh one came last
        await asyncio.gather(*tasks)
        assert "fresh" in done[:4], done  # in the first batch
        assert [t for t in done if t != "fresh"] == [f"b{i}" for i in range(12)]  # backfill in order
    finally:
        await batcher.close()
        await runtime.close()
