"""The same SOP instance stored again — in one association, in another, or concurrently — gives one event."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pydicom

from harness.dicom_peers import STORESCU
from harness.rabbitmq import RabbitNode
from services.ingest.app import IngestService
from services.ingest.tools.make_dicom import make_dicom_file
from tests.support.ingest_service import AE_TITLE, drain, ingest_service_fixture, run  # noqa: F401


async def test_duplicate_c_store_is_idempotent(
    ingest_service: IngestService, rabbit: RabbitNode, shared_data: Path, tmp_path: Path
) -> None:
    images = sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("*.jpeg"))[20:28]
    files = [make_dicom_file(p, tmp_path, transfer_syntax="rle", bits=12) for p in images]
    port = str(ingest_service.dicom_port)
    base = [STORESCU, "-aet", "DUPS", "-aec", AE_TITLE, "-xr", "127.0.0.1", port]

    # each file twice in one association, then three senders at once with the same files
    first = await run([*base, *map(str, files), *map(str, files)])
    assert first.returncode == 0, first.stderr
    parallel = await asyncio.gather(*(run([*base, *map(str, reversed(files))]) for _ in range(3)))
    assert all(r.returncode == 0 for r in parallel), [r.stderr for r in parallel]

    events = await drain(rabbit.url, "inference.images", expected=len(files), settle=2.0)
    counts = Counter(p.image.sop_instance_uid for _, p in events)
    assert counts == Counter({pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: 1 for f in files})
    # one stored file per instance; study counts did not grow with the repeats
    assert len([p for p in ingest_service.store.root.rglob("*.dcm")]) == len(files)
    assert all(p.study_image_count >= 1 for _, p in events)
    stored_per_study = Counter(p.image.study_instance_uid for _, p in events)
    assert max(p.study_image_count for _, p in events) == max(stored_per_study.values())
