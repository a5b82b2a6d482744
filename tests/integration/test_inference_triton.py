"""A real tritonserver (nvidia-pytriton's binary, python backend running the ONNX with onnxruntime):
the service's predictions through Triton equal the embedded onnxruntime ones on real images, and
`pneumotriage model deploy` rolls a version forward and back with explicit model control."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from harness.rabbitmq import RabbitNode
from services.core.broker import Broker
from services.inference.config import InferenceSettings
from services.inference.deploy import read_version_policy
from services.inference.runtime import ModelRepository, OnnxRuntime, TritonRuntime
from services.inference.tools.local_triton import LocalTriton
from services.inference.worker import Pipeline, load_image
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
from tests.support.triton import (  # noqa: F401
    exported_candidate,
    inference_repository_fixture,
    private_triton_fixture,
    triton_server_fixture,
)

pytestmark = pytest.mark.triton


async def test_triton_and_embedded_give_the_same_outputs_on_real_images(
    triton_server: LocalTriton, inference_repository: Path, shared_data: Path
) -> None:
    files = shared_dicoms(shared_data)
    repo = ModelRepository(inference_repository, "pneumonia")
    embedded = OnnxRuntime(repo, threads=1)
    triton = TritonRuntime(triton_server.grpc_url, repo)
    await embedded.start()
    await triton.start()
    try:
        assert await triton.ready()
        assert triton.input_size == embedded.input_size
        events = [image_received(p, uid_for(400 + i)) for i, p in enumerate(files)]
        batch = np.stack([load_image(e.image.storage_uri, e.image.sha256, embedded.input_size).tensor for e in events])
        a, b = await embedded.infer(batch), await triton.infer(batch)
        assert b.model_version == a.model_version == "1"
        assert np.max(np.abs(a.logits - b.logits)) < 1e-5
        assert a.cams.shape == b.cams.shape
        assert np.max(np.abs(a.cams - b.cams)) < 1e-5

        # and through the whole pipeline (decode, micro-batching, calibration), concurrently
        async def predict(runtime: OnnxRuntime | TritonRuntime) -> list:
            pipeline = Pipeline(runtime, max_batch=4, max_wait_ms=20)
            pipeline.start()
            try:
                return list(await asyncio.gather(*(pipeline.predict(e) for e in events)))
            finally:
                await pipeline.close()

        pe, pt = await predict(embedded), await predict(triton)
        for x, y in zip(pe, pt, strict=True):
            assert (x.runtime, y.runtime) == ("onnxruntime", "triton")
            assert x.model_version == y.model_version == "1"
            assert abs(x.probability - y.probability) < 1e-5
            assert abs(x.logit - y.logit) < 1e-5
        assert np.std([x.probability for x in pe]) > 0
    finally:
        await embedded.close()
        await triton.close()


async def test_service_through_triton_publishes_triton_predictions(
    broker: Broker,
    rabbit: RabbitNode,
    triton_server: LocalTriton,
    inference_repository: Path,
    shared_data: Path,
    tmp_path: Path,
) -> None:
    files = store_copies(shared_dicoms(shared_data)[:6], tmp_path / "store")
    events = [image_received(p, uid_for(500 + i)) for i, p in enumerate(files)]
    settings = service_settings(rabbit.url, tmp_path, inference_repository, triton_url=triton_server.grpc_url)
    async with running_service(settings):
        await publish_events(broker, events)
        got = await collect_predictions(broker, len(events), timeout=60, settle=0.5)
    assert sorted(p.image.sop_instance_uid for p, _ in got) == sorted(e.image.sop_instance_uid for e in events)
    assert {(p.runtime, p.model_version) for p, _ in got} == {("triton", "1")}


def _triton_logits(server: LocalTriton, batch: np.ndarray) -> tuple[np.ndarray, str]:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    inp = grpcclient.InferInput("image", list(batch.shape), "FP32")
    inp.set_data_from_numpy(batch)
    result = client.infer("pneumonia", [inp])
    client.close()
    return result.as_numpy("logit").reshape(-1), result.get_response().model_version


def test_model_deploy_rolls_forward_and_back(private_triton: LocalTriton, tmp_path: Path, shared_data: Path) -> None:
    from services.cli import app

    repo = private_triton.model_repository
    size = ModelRepository(repo, "pneumonia").get("1").input_size
    files = shared_dicoms(shared_data)[:4]
    events = [image_received(p, uid_for(600 + i)) for i, p in enumerate(files)]
    batch = np.stack([load_image(e.image.storage_uri, e.image.sha256, size).tensor for e in events])
    v1_logits, version = _triton_logits(private_triton, batch)
    assert version == "1"

    candidate = exported_candidate(tmp_path / "export", seed=7, temperature=2.0)
    runner = CliRunner()
    base = ["model", "deploy", "--repository", str(repo), "--triton-url", private_triton.grpc_url]
    # random weights: the quality gate refuses it; forced with a reason, it is recorded (issue 27)
    gate = ["--reference-data", str(_reference(shared_data, tmp_path)), "--reference-split", "all"]
    result = runner.invoke(app, [*base, "--model-dir", str(candidate), *gate])
    assert result.exit_code == 3, result.output
    assert read_version_policy((repo / "pneumonia" / "config.pbtxt").read_text()) == []
    result = runner.invoke(app, [*base, "--model-dir", str(candidate), *gate, "--force", "--reason", "test"])
    assert result.exit_code == 0, result.output
    assert "version 2 added and pinned (was version 1)" in result.output  # the Triton repository's own numbers
    assert read_version_policy((repo / "pneumonia" / "config.pbtxt").read_text()) == [2]
    meta = json.loads((repo / "pneumonia" / "2" / "metadata.json").read_text())
    assert meta["version"] == "2" and meta["calibration"]["temperature"] == 2.0
    v2_logits, version = _triton_logits(private_triton, batch)
    assert version == "2"
    assert np.max(np.abs(v2_logits - v1_logits)) > 1e-4  # another model answers

    # the embedded runtime honours the pin too, and calibrates with version 2's temperature
    settings = InferenceSettings(model_repository=repo, ort_threads=1)
    assert ModelRepository(settings.model_repository, "pneumonia").resolve() == "2"

    result = runner.invoke(app, [*base, "--version", "1"])  # roll back
    assert result.exit_code == 0, result.output
    back_logits, version = _triton_logits(private_triton, batch)
    assert version == "1"
    assert np.max(np.abs(back_logits - v1_logits)) < 1e-6

    # a second deploy of the same files is refused under an existing number with other content
    result = runner.invoke(app, [*base, "--model-dir", str(candidate), "--version", "1", *gate])
    assert result.exit_code == 2 and "already exists" in result.output

    # the pin is in config.pbtxt: a restarted Triton serves the rolled-back version
    private_triton.kill()
    private_triton.start()
    _, version = _triton_logits(private_triton, batch)
    assert version == "1"


def _reference(shared_data: Path, tmp_path: Path) -> Path:
    root = tmp_path / "reference"
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True)
        for src in sorted((shared_data / "kermany224" / "train" / cls).glob("*.jpeg"))[:8]:
            (root / cls / src.name).symlink_to(src)
    return root


async def test_version_without_local_calibration_is_held_not_failed(
    triton_server: LocalTriton, inference_repository: Path, tmp_path: Path
) -> None:
    from services.inference.runtime import RuntimeUnavailable

    empty = ModelRepository(tmp_path / "not-mounted", "pneumonia")
    runtime = TritonRuntime(triton_server.grpc_url, empty)
    await runtime.start()
    try:
        batch = np.zeros((1, 1, runtime.input_size, runtime.input_size), np.float32)
        with pytest.raises(RuntimeUnavailable, match=r"metadata\.json"):
            await runtime.infer(batch)
    finally:
        await runtime.close()
