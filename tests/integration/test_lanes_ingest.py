"""Ingest classes each image fresh or backfill (issue 24) on both DICOM paths: the C-STORE Priority
(HIGH → fresh), the acquisition date against PT_INGEST_BACKFILL_AGE_H, a backfill calling AE; a
backfill image.received goes to the consumers' `.backfill` queues, a fresh one to the usual ones."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE

from harness.rabbitmq import RabbitNode
from harness.system_dicom import make_study_set
from services.ingest.app import IngestService
from tests.support.ingest_service import AE_TITLE, call, drain, ingest_settings


def _send(port: int, calling_ae: str, items: list[tuple[pydicom.Dataset, int]]) -> list[int]:
    scu = AE(ae_title=calling_ae)
    for ds, _ in items:
        scu.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    assoc = scu.associate("127.0.0.1", port, ae_title=AE_TITLE)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(ds, priority=priority).Status) for ds, priority in items]
    finally:
        assoc.release()


def _dated(ds: pydicom.Dataset, when: datetime) -> pydicom.Dataset:
    for key in ("Study", "Series", "Acquisition", "Content"):
        setattr(ds, f"{key}Date", when.strftime("%Y%m%d"))
        setattr(ds, f"{key}Time", when.strftime("%H%M%S"))
    return ds


@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "pynetdicom-path"])
async def test_ingest_puts_each_image_in_its_lane(
    tmp_path: Path, rabbit: RabbitNode, broker: object, shared_data: Path, fast_path: bool
) -> None:
    files = make_study_set(shared_data, tmp_path / "in", 4)
    ds = [pydicom.dcmread(f.path) for f in files]
    now, old = datetime.now(), datetime.now() - timedelta(days=40)
    today_medium, old_medium, old_high, migrated_high = (
        _dated(ds[0], now),
        _dated(ds[1], old),
        _dated(ds[2], old),
        _dated(ds[3], now),
    )
    settings = ingest_settings(tmp_path, rabbit.url, fast_path=fast_path, backfill_aes="MIGRATE", backfill_age_h=24)
    service = await IngestService(settings).start(http=False)
    try:
        assert (
            await call(_send, service.dicom_port, "PACS", [(today_medium, 0), (old_medium, 0), (old_high, 1)])
            == [0] * 3
        )
        assert await call(_send, service.dicom_port, "MIGRATE", [(migrated_high, 1)]) == [0]
        fresh = {p.image.sop_instance_uid: p for _, p in await drain(rabbit.url, "inference.images", 2)}
        backfill = {p.image.sop_instance_uid: p for _, p in await drain(rabbit.url, "inference.images.backfill", 2)}
    finally:
        await service.stop()
    assert set(fresh) == {today_medium.SOPInstanceUID, old_high.SOPInstanceUID}
    assert set(backfill) == {old_medium.SOPInstanceUID, migrated_high.SOPInstanceUID}
    assert fresh[old_high.SOPInstanceUID].lane_reason == "priority HIGH"
    assert fresh[today_medium.SOPInstanceUID].image.lane == "fresh"
    assert backfill[old_medium.SOPInstanceUID].image.lane == "backfill"
    assert "older than 24 h" in backfill[old_medium.SOPInstanceUID].lane_reason
    assert backfill[migrated_high.SOPInstanceUID].lane_reason == "calling AE MIGRATE is a backfill AE"
