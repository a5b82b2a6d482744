"""End to end through the real inference service (embedded onnxruntime) and the real aggregator on
one RabbitMQ node: DICOM files that claim DX / CHEST / PA but hold something else (pydicom's CT,
MR, NM and US images at their own size, a 10 × 10 test pattern, a 128 × 128 image, noise, an
inverted and a rotated chest) are never flagged URGENT, PNEUMONIA_SUSPECTED or LIKELY_HEALTHY, and
the worklist API shows the reason; real chest X-rays (8-bit, 12-bit MONOCHROME1, true aspect) are
triaged, none refused."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest

from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.aggregator.models import Study
from services.aggregator.service import Aggregator
from services.core.broker import Broker
from tests.support.aggregator_service import aggregator_fixture  # noqa: F401
from tests.support.gate_corpus import chest_corpus, non_chest_corpus
from tests.support.inference_service import image_received, publish_events, running_service, service_settings
from tests.support.triton import inference_repository_fixture  # noqa: F401

pytestmark = pytest.mark.timeout(600)


async def test_non_chest_images_are_never_flagged_and_chests_are_triaged(
    aggregator: Aggregator,
    broker: Broker,
    rabbit: RabbitNode,
    shared_data: Path,
    tmp_path: Path,
    inference_repository: Path,
) -> None:
    store = tmp_path / "store"
    store.mkdir()
    events, names, kinds = [], {}, {}
    for kind, corpus in (("non_chest", non_chest_corpus(shared_data)), ("chest", chest_corpus(shared_data))):
        for i, (name, raw) in enumerate(corpus):
            ds = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True)
            assert ds.Modality == "DX" and ds.BodyPartExamined == "CHEST"  # the header says chest
            path = store / f"{kind}-{i}.dcm"
            path.write_bytes(raw)
            study = f"1.2.826.0.1.3680043.8.498.60.{len(events)}"
            event = image_received(path, f"{study}.1")
            event.image.study_instance_uid = study
            events.append(event)
            names[study], kinds[study] = name, kind
    assert sum(k == "non_chest" for k in kinds.values()) >= 10

    settings = service_settings(rabbit.url, tmp_path, inference_repository, max_batch=8)
    async with running_service(settings):
        await publish_events(broker, events)

        async def all_flagged() -> bool:
            async with aggregator.sessions() as s:
                rows = [await s.get(Study, uid) for uid in names]
            return all(r is not None and r.flag not in ("PENDING", "") for r in rows)

        await eventually_async(all_flagged, timeout=240, what="a flag for every study")

    async with aggregator.sessions() as s:
        results = {uid: await s.get(Study, uid) for uid in names}
    wrong, refused_chests = [], []
    for uid, row in results.items():
        assert row is not None
        if kinds[uid] == "non_chest":
            if row.flag in ("URGENT", "PNEUMONIA_SUSPECTED", "LIKELY_HEALTHY"):
                wrong.append((names[uid], row.flag, row.reason))
            assert row.reason.startswith("input gate:"), (names[uid], row.flag, row.reason)
        elif row.flag == "NOT_TRIAGED":
            refused_chests.append((names[uid], row.reason))
    assert not wrong, f"non-chest images flagged: {wrong}"
    assert not refused_chests, f"chest X-rays refused: {refused_chests}"
    tiny = next(uid for uid, n in names.items() if n == "test pattern 10x10")
    assert results[tiny].flag == "NOT_TRIAGED" and "too small to read" in results[tiny].reason  # type: ignore[union-attr]
