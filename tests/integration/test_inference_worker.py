"""The inference service (embedded onnxruntime) against a real RabbitMQ node and real DICOM files:
predictions published with confirm, bad images dead-lettered with their reason, ineligible images
skipped, duplicates answered with the same prediction, /healthz and /metrics served."""

from __future__ import annotations

import asyncio
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client import REGISTRY

from harness.rabbitmq import RabbitNode
from services.core.broker import Broker
from services.core.net import free_port
from services.inference.runtime import ModelRepository
from tests.support.inference_service import (
    collect_predictions,
    dead_letters,
    image_received,
    publish_events,
    running_service,
    service_settings,
    shared_dicoms,
    store_copies,
    uid_for,
)
from tests.support.triton import inference_repository_fixture  # noqa: F401


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels or {}) or 0.0


async def test_service_predicts_real_dicoms_and_dead_letters_bad_ones(
    broker: Broker, rabbit: RabbitNode, shared_data: Path, tmp_path: Path, inference_repository: Path
) -> None:
    files = store_copies(shared_dicoms(shared_data), tmp_path / "store")
    assert len(files) >= 12
    good = [image_received(p, uid_for(i)) for i, p in enumerate(files)]
    ineligible = image_received(files[0], uid_for(100), eligible=False)
    mismatch = image_received(files[1], uid_for(101), sha256="0" * 64)
    truncated = tmp_path / "store" / "truncated.dcm"
    truncated.write_bytes(files[2].read_bytes()[:1500])
    undecodable = image_received(truncated, uid_for(102))
    not_dicom = tmp_path / "store" / "notes.dcm"
    not_dicom.write_text("this is not a DICOM file\n" * 20)
    garbage = image_received(not_dicom, uid_for(103))

    settings = service_settings(rabbit.url, tmp_path, inference_repository, max_batch=8)
    skipped_before = _metric("pt_inference_skipped_total", {"reason": "not_triage_eligible"})
    async with running_service(settings) as service:
        await publish_events(broker, [*good, ineligible, mismatch, undecodable, garbage])
        got = await collect_predictions(broker, len(good), timeout=90, settle=1.0)

        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.http_port}", timeout=10) as http:
            health = await http.get("/healthz")
            metrics = (await http.get("/metrics")).text
        assert health.status_code == 200, health.text
        assert health.json()["checks"]["runtime"]["version"] == service.runtime.model_version
        assert "pt_inference_latency_seconds_bucket" in metrics
        assert "pt_inference_batch_size_bucket" in metrics
        version = service.runtime.model_version

    predictions = {p.image.sop_instance_uid: (p, m) for p, m in got}
    assert sorted(predictions) == sorted(e.image.sop_instance_uid for e in good)  # ineligible/bad: none
    model = ModelRepository(inference_repository, "pneumonia").get(version)
    heatmaps: list[Path] = []
    for event in good:
        p, message = predictions[event.image.sop_instance_uid]
        assert p.image == event.image
        assert 0.0 < p.probability < 1.0
        assert abs(p.probability - float(model.calibration.apply(p.logit))) < 1e-12
        assert (p.model_name, p.model_version, p.runtime) == ("pneumonia", version, "onnxruntime")
        assert p.latency_ms > 0
        assert p.received_at == event.received_at
        assert p.predicted_at.seconds >= event.received_at.seconds
        assert message.message_id == f"inference:{event.image.sop_instance_uid}:{version}"
        assert message.correlation_id == event.image.sop_instance_uid
        heatmaps.append(Path(urllib.request.url2pathname(p.heatmap_uri.removeprefix("file://"))))
    assert all(h.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for h in heatmaps)
    # the model ran on the pixels: different images, different logits
    assert len({round(predictions[e.image.sop_instance_uid][0].logit, 6) for e in good}) > 1

    dlq = dict(await dead_letters(broker))
    assert set(dlq) == {uid_for(101), uid_for(102), uid_for(103)}
    assert "sha256 mismatch" in dlq[uid_for(101)]
    assert "undecodable" in dlq[uid_for(102)]
    assert "undecodable" in dlq[uid_for(103)]
    assert _metric("pt_inference_skipped_total", {"reason": "not_triage_eligible"}) == skipped_before + 1
    depths = rabbit.queue_depths()
    assert depths["inference.images"] == 0
    assert all(depths[q] == 0 for q in depths if q.startswith("inference.images.retry"))


async def test_duplicate_delivery_gets_the_same_prediction_without_rerunning(
    broker: Broker, rabbit: RabbitNode, shared_data: Path, tmp_path: Path, inference_repository: Path
) -> None:
    [path] = store_copies(shared_dicoms(shared_data)[:1], tmp_path / "store")
    event = image_received(path, uid_for(200))
    settings = service_settings(rabbit.url, tmp_path, inference_repository)
    duplicates_before = _metric("pt_inference_duplicates_total")
    async with running_service(settings) as service:
        version = service.runtime.model_version
        ran_before = _metric("pt_inference_predictions_total", {"model_version": version, "runtime": "onnxruntime"})
        await publish_events(broker, [event])
        first = await collect_predictions(broker, 1, timeout=60)
        await publish_events(broker, [event, event])  # redelivered twice more, one of them concurrently
        again = await collect_predictions(broker, 2, timeout=60, settle=1.0)
        ran = _metric("pt_inference_predictions_total", {"model_version": version, "runtime": "onnxruntime"})
    assert len(first) == 1 and len(again) == 2
    bodies = {m.body for _, m in first + again}
    assert len(bodies) == 1, "a duplicate must not produce a different prediction"
    assert {m.message_id for _, m in first + again} == {f"inference:{uid_for(200)}:{version}"}
    assert ran - ran_before == 1
    assert _metric("pt_inference_duplicates_total") - duplicates_before == 2


async def test_micro_batching_under_concurrency_matches_single_image_results(
    shared_data: Path, tmp_path: Path, inference_repository: Path
) -> None:
    from services.inference.runtime import OnnxRuntime
    from services.inference.worker import Pipeline

    files = store_copies(shared_dicoms(shared_data), tmp_path / "store")
    events = [image_received(p, uid_for(300 + i)) for i, p in enumerate(files)]

    async def predict_all(max_batch: int, concurrent: bool) -> list:
        runtime = OnnxRuntime(ModelRepository(inference_repository, "pneumonia"), threads=1)
        await runtime.start()
        pipeline = Pipeline(runtime, max_batch=max_batch, max_wait_ms=50)
        pipeline.start()
        try:
            if concurrent:
                return list(await asyncio.gather(*(pipeline.predict(e) for e in events)))
            return [await pipeline.predict(e) for e in events]
        finally:
            await pipeline.close()
            await runtime.close()

    batches_before = _metric("pt_inference_batch_size_count")
    images_before = _metric("pt_inference_batch_size_sum")
    batched = await predict_all(max_batch=8, concurrent=True)
    n_batches = _metric("pt_inference_batch_size_count") - batches_before
    assert _metric("pt_inference_batch_size_sum") - images_before == len(events)
    assert n_batches < len(events), "concurrent images were not batched"
    assert n_batches >= -(-len(events) // 8), "a batch exceeded max_batch"
    single = await predict_all(max_batch=1, concurrent=False)
    for a, b in zip(batched, single, strict=True):
        assert a.image.sop_instance_uid == b.image.sop_instance_uid
        assert abs(a.logit - b.logit) < 1e-5
        assert abs(a.probability - b.probability) < 1e-5
    assert np.std([p.logit for p in single]) > 0


async def test_decoding_in_worker_processes_gives_the_same_predictions_and_errors(
    shared_data: Path, tmp_path: Path, inference_repository: Path
) -> None:
    from services.inference.runtime import OnnxRuntime
    from services.inference.worker import BadImage, Pipeline

    files = store_copies(shared_dicoms(shared_data)[:4], tmp_path / "store")
    events = [image_received(p, uid_for(800 + i)) for i, p in enumerate(files)]
    runtime = OnnxRuntime(ModelRepository(inference_repository, "pneumonia"), threads=1)
    await runtime.start()
    threads = Pipeline(runtime, max_batch=4)
    processes = Pipeline(runtime, max_batch=4, decode_processes=1)
    threads.start()
    processes.start()
    try:
        a = await asyncio.gather(*(threads.predict(e) for e in events))
        b = await asyncio.gather(*(processes.predict(e) for e in events))
        assert [x.logit for x in a] == pytest.approx([y.logit for y in b], abs=1e-6)
        bad = image_received(files[0], uid_for(899), sha256="f" * 64)
        with pytest.raises(BadImage) as err:
            await processes.predict(bad)
        assert err.value.kind == "sha256_mismatch" and "sha256 mismatch" in str(err.value)
    finally:
        await threads.close()
        await processes.close()
        await runtime.close()


async def test_graceful_stop_finishes_in_flight_and_returns_the_rest_to_the_queue(
    broker: Broker, rabbit: RabbitNode, shared_data: Path, tmp_path: Path, inference_repository: Path
) -> None:
    files = store_copies(shared_dicoms(shared_data), tmp_path / "store")
    events = [image_received(files[i % len(files)], uid_for(1000 + i)) for i in range(40)]
    # batches never fill (2 in flight, batch of 4): ~20 images/s, so the stop lands mid-run
    settings = service_settings(
        rabbit.url, tmp_path, inference_repository, prefetch=2, max_batch=4, max_wait_ms=100, heatmaps=False
    )
    async with running_service(settings):
        await publish_events(broker, events)
        first = await collect_predictions(broker, 5, timeout=60)
    # stopped: what was in flight was published, the rest is back in the queue, unharmed
    rest = await collect_predictions(broker, 40, timeout=3)
    depth = rabbit.queue_depths()["inference.images"]
    predicted = {p.image.sop_instance_uid for p, _ in first + rest}
    assert depth > 0, "the run finished before the stop: nothing was tested"
    assert len(predicted) + depth == len(events)
    assert await dead_letters(broker) == []

    settings = settings.model_copy(update={"http_port": free_port()})
    async with running_service(settings):  # a new consumer finishes the job
        more = await collect_predictions(broker, depth, timeout=60, settle=0.5)
    assert predicted | {p.image.sop_instance_uid for p, _ in more} == {e.image.sop_instance_uid for e in events}
