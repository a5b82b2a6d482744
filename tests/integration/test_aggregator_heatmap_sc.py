"""The heatmap where the radiologist looks (issue 23, item 3), against a real Orthanc as the PACS:
with PT_AGGREGATOR_SEND_HEATMAP_SC, each SR revision carries a Secondary Capture per judged image
(services/aggregator/heatmap_sc.py), frozen with the SR and sent before it on the same association
(which proposes Secondary Capture Image Storage too); it lands in the image's study, in a series of
its own; a re-send sends the same bytes under the same SOP Instance UID. Off by default.

Before: heatmap_sc.py built the object but nothing queued or sent it (no SC ever reached the PACS)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from sqlalchemy import select

from harness.dicom_peers import Orthanc, orthanc_fixture  # noqa: F401
from services.aggregator.config import AggregatorSettings
from services.aggregator.heatmap_sc import SECONDARY_CAPTURE, sc_uids
from services.aggregator.models import SrDelivery, SrDeliveryObject, SrSend
from services.aggregator.service import Aggregator
from services.aggregator.sr import sr_uids
from services.inference.heatmaps import render_heatmap
from tests.integration.test_aggregator_sr_chain import study_files
from tests.support.aggregator_service import apply_events, prediction, received, write_test_policy


async def make_aggregator(orthanc: Orthanc, tmp_path: Path, **kw: object) -> Aggregator:
    settings = AggregatorSettings(
        data_dir=tmp_path,
        policy_file=write_test_policy(tmp_path / "policy.yaml"),
        sr_destination=f"127.0.0.1:{orthanc.dicom_port}:{orthanc.aet}",
        sr_settle_s=0,
        secret_key="x",
        **kw,
    )
    agg = Aggregator(settings)
    await agg.migrate()
    return agg


def heatmap_file(tmp_path: Path) -> str:
    cam = np.zeros((7, 7), dtype=np.float32)
    cam[2:5, 1:3] = 1.0
    buf = io.BytesIO()
    render_heatmap(cam, 224, 224, 224).save(buf, format="PNG")
    path = tmp_path / "heatmap.png"
    path.write_bytes(buf.getvalue())
    return path.as_uri()


def in_study(orthanc: Orthanc, study: str) -> list[dict]:
    tags = [orthanc.instance_tags(i) for i in orthanc.instances()]
    return [t for t in tags if t.get("StudyInstanceUID") == study]


async def test_heatmap_sc_arrives_in_the_same_study_new_series_with_the_sr(
    orthanc: Orthanc, shared_data: Path, tmp_path: Path
) -> None:
    study, images = study_files(shared_data, tmp_path, 2)
    hm = heatmap_file(tmp_path)
    agg = await make_aggregator(orthanc, tmp_path, send_heatmap_sc=True)
    try:
        for sop, uri, _ in images:
            await apply_events(
                agg, received(sop, study, storage_uri=uri), prediction(sop, 0.97, study=study, heatmap_uri=hm)
            )
        assert await agg.send_pending_srs() == 1  # URGENT: at once, one SR with its 2 SCs
        async with agg.sessions() as s:
            (delivery,) = (await s.scalars(select(SrDelivery))).all()
            frozen = {o.sop_uid: o.dataset for o in await s.scalars(select(SrDeliveryObject))}
        assert delivery.status == "sent"
        tags = in_study(orthanc, study)
        scs = [t for t in tags if t["SOPClassUID"] == SECONDARY_CAPTURE]
        srs = [t for t in tags if t.get("Modality") == "SR"]
        assert len(scs) == 2 and len(srs) == 1, [t.get("Modality") for t in tags]
        sc_series = {t["SeriesInstanceUID"] for t in scs}
        assert len(sc_series) == 1, "one heatmap series per study"
        assert sc_series.isdisjoint({study + ".1", sr_uids(study, delivery.revision)[0]}), "a series of its own"
        assert (
            {t["SOPInstanceUID"] for t in scs}
            == set(frozen)
            == {sc_uids(study, sop, delivery.revision)[1] for sop, _, _ in images}
        )
        assert {t["SourceImageSequence"][0]["ReferencedSOPInstanceUID"] for t in scs} == {s for s, _, _ in images}
        assert all(t["BurnedInAnnotation"] == "YES" for t in scs)

        # A lost acknowledgement: the delivery is retried, with the same frozen bytes.
        async with agg.sessions() as s:
            row = await s.get(SrDelivery, delivery.id)
            assert row is not None
            row.status = "pending"
            for send in await s.scalars(select(SrSend)):  # its one destination's send
                send.status = "pending"
            await s.commit()
        assert await agg.send_pending_srs() == 1
        async with agg.sessions() as s:
            again = {o.sop_uid: o.dataset for o in await s.scalars(select(SrDeliveryObject))}
        assert again == frozen, "never the same SOP Instance UID with different content"
        assert len([t for t in in_study(orthanc, study) if t["SOPClassUID"] == SECONDARY_CAPTURE]) == 2
    finally:
        await agg.engine.dispose()


async def test_no_heatmap_sc_by_default(orthanc: Orthanc, shared_data: Path, tmp_path: Path) -> None:
    study, [(sop, uri, _)] = study_files(shared_data, tmp_path, 1)
    agg = await make_aggregator(orthanc, tmp_path)
    try:
        await apply_events(
            agg,
            received(sop, study, storage_uri=uri),
            prediction(sop, 0.97, study=study, heatmap_uri=heatmap_file(tmp_path)),
        )
        assert await agg.send_pending_srs() == 1
    finally:
        await agg.engine.dispose()
    assert [t.get("Modality") for t in in_study(orthanc, study)] == ["SR"]
