"""rescore.requested in the inference service (issue 27, item 3), real RabbitMQ and real DICOM: a
re-score is predicted again by the version served now even though the same image's prediction is
in the duplicate cache (an image.received duplicate is answered from it), it names the withdrawn
version and the reason, its message id differs from the first prediction's, a redelivered request
is answered once, and a request to replace the very version still served is dead-lettered."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import REGISTRY

from harness.queues import take
from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.core.broker import Broker
from services.core.contracts import RescoreRequested
from tests.support.inference_service import (
    collect_predictions,
    image_received,
    publish_events,
    running_service,
    service_settings,
    shared_dicoms,
    store_copies,
    uid_for,
)
from tests.support.triton import inference_repository_fixture  # noqa: F401


def _ran(version: str) -> float:
    labels = {"model_version": version, "runtime": "onnxruntime"}
    return REGISTRY.get_sample_value("pt_inference_predictions_total", labels) or 0.0


def rescore_request(event: object, withdrawn: str, request_id: str) -> RescoreRequested:
    msg = RescoreRequested(
        image=event.image,  # type: ignore[attr-defined]
        withdrawn_model_version=withdrawn,
        reason=f"model version {withdrawn} withdrawn: test",
        request_id=request_id,
    )
    msg.requested_at.GetCurrentTime()
    return msg


async def test_rescore_bypasses_the_duplicate_cache_and_never_lets_the_withdrawn_version_answer(
    broker: Broker, rabbit: RabbitNode, shared_data: Path, tmp_path: Path, inference_repository: Path
) -> None:
    [path] = store_copies(shared_dicoms(shared_data)[:1], tmp_path / "store")
    uid = uid_for(300)
    event = image_received(path, uid)
    settings = service_settings(rabbit.url, tmp_path, inference_repository)
    async with running_service(settings) as service:
        version = service.runtime.model_version
        await publish_events(broker, [event])
        [(first, _)] = await collect_predictions(broker, 1, timeout=60)
        ran_before = _ran(version)

        request = rescore_request(event, "99", "req-a")
        for _ in range(2):  # the request and a redelivery of it
            await broker.publish("rescore.requested", request, message_id=f"rescore:req-a:{uid}", correlation_id=uid)
        rescored = await collect_predictions(broker, 2, timeout=60, settle=1.0)
        assert _ran(version) - ran_before == 1, "predicted once again, not answered from the image.received cache"

        same = rescore_request(event, version, "req-b")  # the version served is the one 'withdrawn'
        await broker.publish("rescore.requested", same, message_id=f"rescore:req-b:{uid}", correlation_id=uid)
        dead: list[tuple[str, str]] = []

        async def dead_lettered() -> bool:
            assert broker.connection is not None
            for m in await take(broker.connection, "inference.images.dlq"):
                reason = str((m.headers or {}).get("x-death-reason", ""))
                dead.append((RescoreRequested.FromString(m.body).image.sop_instance_uid, reason))
            return bool(dead)

        await eventually_async(dead_lettered, timeout=60, what="the request dead-lettered")
        assert not await collect_predictions(broker, 0, timeout=3, settle=2.0)
    assert first.rescore_of_model_version == ""
    assert len(rescored) == 2 and len({m.body for _, m in rescored}) == 1
    pred, message = rescored[0]
    assert pred.model_version == version and pred.rescore_of_model_version == "99"
    assert pred.rescore_reason == "model version 99 withdrawn: test" and pred.rescore_request_id == "req-a"
    assert message.message_id == f"inference:{uid}:{version}:rescore:req-a"
    assert [sop for sop, _ in dead] == [uid] and "still the version served" in dead[0][1]
