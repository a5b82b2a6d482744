"""Shadow mode (issue 28): a shadow version is scored on every live image and stored, and never reaches
a clinical output. Real RabbitMQ, the real inference service and the real aggregator: the shadow
version says the opposite of the active one (and has the higher version number, which the aggregator
would let supersede the active one), yet the flag, the stored predictions and triage.updated are the
active version's alone."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import numpy as np
from sqlalchemy import select

from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.aggregator.models import PredictionRow, Study
from services.aggregator.service import Aggregator
from services.core.broker import Broker
from services.inference.shadow import ShadowStore, parse_versions, store_path
from tests.support.aggregator_service import (  # noqa: F401
    TriageTap,
    aggregator_fixture,
    triage_tap_fixture,
)
from tests.support.inference_model import build_tiny_onnx, write_version
from tests.support.inference_service import (
    image_received,
    publish_events,
    running_service,
    service_settings,
    shared_dicoms,
    store_copies,
    uid_for,
)

STUDY = "1.2.826.0.1.3680043.8.498.1"  # tests.support.inference_service.image_received's study


def _platt(vdir: Path, b: float) -> None:
    """A calibration that ignores the logit: p = sigmoid(b) for every image."""
    meta = json.loads((vdir / "metadata.json").read_text())
    meta["calibration"] = {"method": "platt", "a": 0.0, "b": b}
    (vdir / "metadata.json").write_text(json.dumps(meta))


def test_parse_versions() -> None:
    assert parse_versions("") == [] and parse_versions(" 3, 4,3 ") == ["3", "4"]
    try:
        parse_versions("v3")
    except ValueError as exc:
        assert "v3" in str(exc)
    else:
        raise AssertionError("a non-numeric shadow version must be refused")


async def test_shadow_never_reaches_the_flag(
    rabbit: RabbitNode,
    broker: Broker,
    aggregator: Aggregator,
    triage_tap: TriageTap,
    shared_data: Path,
    tmp_path: Path,
) -> None:
    onnx = build_tiny_onnx(tmp_path / "tiny.onnx", input_size=64)
    repository = tmp_path / "repo"
    _platt(write_version(repository, 1, onnx), -8.0)  # active: p ~ 0.0003 -> LIKELY_HEALTHY
    _platt(write_version(repository, 2, onnx), 8.0)  # shadow: p ~ 0.9997 -> would be URGENT
    images = store_copies(shared_dicoms(shared_data)[:3], tmp_path / "store")
    events = [image_received(p, uid_for(900 + i)) for i, p in enumerate(images)]
    settings = service_settings(
        rabbit.url, tmp_path, repository, model_version="1", shadow_versions="2", gate=False, heatmaps=False
    )
    shadow = ShadowStore(store_path(settings.data_dir))

    async def predictions() -> list[PredictionRow]:
        async with aggregator.sessions() as s:
            return list((await s.scalars(select(PredictionRow))).all())

    async with running_service(settings) as service:
        assert (await service.health())["shadow_versions"]["versions"] == ["2"]
        await publish_events(broker, events)
        # the positive marker: every image's active prediction reached the aggregator, every image's
        # shadow prediction is stored, and the outbox has published what followed
        await eventually_async(
            lambda: asyncio.to_thread(lambda: len(shadow.rows("2")) == len(events)), what="shadow rows", timeout=60
        )

        async def settled() -> bool:
            return len(await predictions()) >= len(events) and await aggregator.relay.backlog() == 0

        await eventually_async(settled, what="active predictions in the aggregator", timeout=60)
        depths = await asyncio.to_thread(rabbit.queue_depths)
        assert depths.get("aggregator.events", 0) == 0, depths

    rows = await predictions()
    assert sorted(r.sop_uid for r in rows) == sorted(e.image.sop_instance_uid for e in events)
    assert {r.model_version for r in rows} == {"1"}, "a shadow prediction reached the aggregator"
    assert all(r.probability < 0.01 for r in rows)
    async with aggregator.sessions() as s:
        study = await s.get(Study, STUDY)
    assert study is not None and study.model_version == "1" and study.flag == "LIKELY_HEALTHY", study and (
        study.flag,
        study.model_version,
    )
    await eventually_async(lambda: bool(triage_tap.for_study(STUDY)), what="triage.updated")
    for event in triage_tap.for_study(STUDY):
        assert event.model_version == "1" and event.p_pneumonia < 0.5, event

    stored = shadow.rows("2")
    assert {r["sop_instance_uid"] for r in stored} == {e.image.sop_instance_uid for e in events}
    for r in stored:  # stored and comparable: the shadow's answer beside the active one's on the same image
        assert r["probability"] > 0.99 and r["active_version"] == "1" and r["active_probability"] < 0.01
        assert np.isclose(r["logit"], r["active_logit"], atol=1e-4)  # the same network, the same tensor
