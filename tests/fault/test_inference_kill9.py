"""The inference service as a real process (`python -m services.cli inference`): kill -9 in the middle
of a run loses nothing (every image is predicted after a restart, a redelivered image gets the same
prediction), and SIGTERM drains gracefully (exit 0, nothing left unacked or dead-lettered)."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

from harness.processes import CLI, TestProcess
from harness.rabbitmq import RabbitNode
from services.core.broker import Broker
from services.core.net import free_port
from tests.support.inference_service import (
    collect_predictions,
    dead_letters,
    image_received,
    publish_events,
    shared_dicoms,
    store_copies,
    uid_for,
)
from tests.support.triton import inference_repository_fixture  # noqa: F401

REPO_ROOT = Path(__file__).resolve().parents[2]


def _start(amqp_url: str, tmp: Path, repository: Path, port: int) -> TestProcess:
    env = dict(
        PT_AMQP_URL=amqp_url,
        PT_DATA_DIR=str(tmp / "var"),
        PT_INFERENCE_MODEL_REPOSITORY=str(repository),
        PT_INFERENCE_HTTP_PORT=str(port),
        PT_INFERENCE_ORT_THREADS="1",
        # batches never fill (2 in flight, batch of 4), so each waits max_wait_ms: ~20 images/s,
        # slow enough that the kill surely lands mid-run on any machine
        PT_INFERENCE_MAX_BATCH="4",
        PT_INFERENCE_PREFETCH="2",
        PT_INFERENCE_MAX_WAIT_MS="100",
        PT_LOG_LEVEL="WARNING",
    )
    health = f"http://127.0.0.1:{port}/healthz"
    log = tmp / f"inference-{port}.log"
    unset = ("PT_INFERENCE_TRITON_URL",)
    return TestProcess("inference", [*CLI, "inference"], log, env, REPO_ROOT, health, unset).launch()


async def test_kill_9_mid_run_then_restart_loses_nothing_and_sigterm_drains(
    broker: Broker, rabbit: RabbitNode, shared_data: Path, tmp_path: Path, inference_repository: Path
) -> None:
    files = store_copies(shared_dicoms(shared_data), tmp_path / "store")
    events = [image_received(files[i % len(files)], uid_for(900 + i)) for i in range(120)]
    port = free_port()
    proc = _start(rabbit.url, tmp_path, inference_repository, port)
    try:
        await asyncio.to_thread(proc.wait_healthy, 60)
        await publish_events(broker, events)
        before = await collect_predictions(broker, 20, timeout=60)
        assert len(before) >= 20
        proc.signal(signal.SIGKILL)
        await asyncio.to_thread(proc.wait, 10)
        depths = rabbit.queue_depths()
        assert depths["inference.images"] > 0, "the run finished before the kill: nothing was tested"

        proc = _start(rabbit.url, tmp_path, inference_repository, port)
        await asyncio.to_thread(proc.wait_healthy, 60)
        remaining = {e.image.sop_instance_uid for e in events} - {p.image.sop_instance_uid for p, _ in before}
        after = await collect_predictions(broker, len(remaining), timeout=120, settle=1.0)

        # graceful stop: SIGTERM, exit 0
        proc.signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 60) == 0
    finally:
        proc.stop()

    by_uid: dict[str, set[bytes]] = {}
    for p, m in before + after:
        key = p.image.sop_instance_uid
        by_uid.setdefault(key, set()).add(round(p.probability, 9).hex().encode() + m.message_id.encode())
    assert set(by_uid) == {e.image.sop_instance_uid for e in events}, "an acknowledged image was lost"
    # an image predicted before the kill but not acked is predicted again after the restart: same
    # model version, same message id, same probability (the aggregator dedupes on the message id)
    assert all(len(v) == 1 for v in by_uid.values())
    assert await dead_letters(broker) == []
    depths = rabbit.queue_depths()
    assert depths["inference.images"] == 0
    assert all(depths[q] == 0 for q in depths if q.startswith("inference.images.retry"))
