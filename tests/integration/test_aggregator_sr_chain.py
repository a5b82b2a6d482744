"""One report per study, as a chain (issue 23), against a real Orthanc as the PACS: each SR revision
names the SR it replaces (Predecessor Documents Sequence) and the images it judged (Current Requested
Procedure Evidence Sequence), in one series, with honest Completion/Verification flags; a revision is
held for the settle time and a flip undone within it is never sent (URGENT goes at once); an SR's
content is frozen when it is queued, so one SOP Instance UID never carries two contents."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path
from typing import Any

import pydicom
from pydicom.uid import generate_uid
from sqlalchemy import select

from harness.dicom_peers import Orthanc, orthanc_fixture  # noqa: F401
from services.aggregator.config import AggregatorSettings
from services.aggregator.models import SrDelivery
from services.aggregator.service import Aggregator
from services.aggregator.sr import BASIC_TEXT_SR, Destination, sr_uids
from tests.integration.test_aggregator_outputs import shared_dicom
from tests.support.aggregator_service import apply_events, judgment, prediction, received, write_test_policy


def study_files(shared_data: Path, tmp_path: Path, n: int) -> tuple[str, list[tuple[str, str, str]]]:
    """n copies of a shared X-ray in one new study: (study UID, [(sop UID, storage URI, SOP class)])."""
    src, _ = shared_dicom(shared_data, "PNEUMONIA")
    study = f"1.2.826.0.1.3680043.99.{uuid.uuid4().int % 10**20}"
    out = []
    for i in range(n):
        ds = pydicom.dcmread(src)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, study + ".1"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = tmp_path / f"img{i}.dcm"
        ds.save_as(path)
        out.append((str(ds.SOPInstanceUID), path.as_uri(), str(ds.SOPClassUID)))
    return study, out


async def make_aggregator(orthanc: Orthanc, tmp_path: Path, settle_s: float) -> Aggregator:
    settings = AggregatorSettings(
        data_dir=tmp_path,
        policy_file=write_test_policy(tmp_path / "policy.yaml"),
        sr_destination=f"127.0.0.1:{orthanc.dicom_port}:{orthanc.aet}",
        sr_settle_s=settle_s,
        secret_key="x",
    )
    agg = Aggregator(settings)
    await agg.migrate()
    return agg


def srs_in_pacs(orthanc: Orthanc) -> list[dict[str, Any]]:
    tags = [orthanc.instance_tags(i) for i in orthanc.instances()]
    return sorted((t for t in tags if t.get("Modality") == "SR"), key=lambda t: int(t["InstanceNumber"]))


def refs(sequence: list[dict[str, Any]]) -> set[tuple[str, str, str, str]]:
    """(study, series, SOP class, SOP instance) of a Hierarchical SOP Instance Reference sequence."""
    return {
        (item["StudyInstanceUID"], series["SeriesInstanceUID"], sop["ReferencedSOPClassUID"],
         sop["ReferencedSOPInstanceUID"])
        for item in sequence
        for series in item["ReferencedSeriesSequence"]
        for sop in series["ReferencedSOPSequence"]
    }  # fmt: skip


def flag_of(sr: dict[str, Any]) -> str:
    return next(i["TextValue"] for i in sr["ContentSequence"] if i["TextValue"].startswith("Triage flag"))


async def test_sr_revisions_form_a_chain_with_evidence_and_honest_flags(
    orthanc: Orthanc, shared_data: Path, tmp_path: Path
) -> None:
    study, images = study_files(shared_data, tmp_path, 2)
    (sop1, uri1, cls1), (sop2, uri2, cls2) = images
    agg = await make_aggregator(orthanc, tmp_path, settle_s=0)
    try:
        # Image 1 looks healthy, image 2 has arrived without a score: UNCERTAIN, waiting (PARTIAL).
        await apply_events(agg, received(sop1, study, storage_uri=uri1), prediction(sop1, 0.03, study=study))
        await apply_events(agg, received(sop2, study, storage_uri=uri2))
        assert await agg.send_pending_srs() == 1
        await apply_events(agg, prediction(sop2, 0.97, study=study))  # URGENT, all images judged
        assert await agg.send_pending_srs() == 1
        await agg.review(study, "dr-house", "confirm", None, "")  # a clinician confirms: VERIFIED
        assert await agg.send_pending_srs() == 1
        assert await agg.send_pending_srs() == 0  # nothing is sent twice
        async with agg.sessions() as s:
            deliveries = (await s.scalars(select(SrDelivery).order_by(SrDelivery.id))).all()
        assert [d.attempts for d in deliveries if d.status == "sent"] == [1, 1, 1]
    finally:
        await agg.engine.dispose()

    first, second, third = srs_in_pacs(orthanc)
    assert len({first["SeriesInstanceUID"], second["SeriesInstanceUID"], third["SeriesInstanceUID"]}) == 1
    series = first["SeriesInstanceUID"]
    assert len({first["SOPInstanceUID"], second["SOPInstanceUID"], third["SOPInstanceUID"]}) == 3
    assert "PredecessorDocumentsSequence" not in first
    assert refs(second["PredecessorDocumentsSequence"]) == {(study, series, BASIC_TEXT_SR, first["SOPInstanceUID"])}
    assert refs(third["PredecessorDocumentsSequence"]) == {(study, series, BASIC_TEXT_SR, second["SOPInstanceUID"])}
    # The images each revision judged (image 2 had no score yet for the first).
    assert refs(first["CurrentRequestedProcedureEvidenceSequence"]) == {(study, study + ".1", cls1, sop1)}
    assert refs(second["CurrentRequestedProcedureEvidenceSequence"]) == {
        (study, study + ".1", cls1, sop1),
        (study, study + ".1", cls2, sop2),
    }
    assert "UNCERTAIN" in flag_of(first) and "URGENT" in flag_of(second) and "URGENT" in flag_of(third)
    assert [sr["CompletionFlag"] for sr in (first, second, third)] == ["PARTIAL", "COMPLETE", "COMPLETE"]
    assert [sr["VerificationFlag"] for sr in (first, second, third)] == ["UNVERIFIED", "UNVERIFIED", "VERIFIED"]
    assert third["VerifyingObserverSequence"][0]["VerifyingObserverName"] == "dr-house"


async def test_only_settled_changes_are_sent_and_urgent_goes_at_once(
    orthanc: Orthanc, shared_data: Path, tmp_path: Path
) -> None:
    settle = 1.0
    study, images = study_files(shared_data, tmp_path, 4)
    agg = await make_aggregator(orthanc, tmp_path, settle_s=settle)
    try:
        # The study arrives image by image: LIKELY_HEALTHY -> UNCERTAIN -> LIKELY_HEALTHY within the
        # settle time, a send round after each change: nothing goes out until it has settled.
        (sop1, uri1, _), (sop2, uri2, _), (sop3, uri3, _), (sop4, uri4, _) = images
        await apply_events(agg, received(sop1, study, storage_uri=uri1), prediction(sop1, 0.03, study=study))
        assert await agg.send_pending_srs() == 0
        await apply_events(agg, received(sop2, study, storage_uri=uri2))
        assert await agg.send_pending_srs() == 0
        await apply_events(agg, prediction(sop2, 0.05, study=study))
        assert await agg.send_pending_srs() == 0
        await asyncio.sleep(settle + 0.2)
        assert await agg.send_pending_srs() == 1  # one SR for the settled LIKELY_HEALTHY
        # Another flip undone within the settle time: the PACS already says LIKELY_HEALTHY, nothing sent.
        await apply_events(agg, received(sop3, study, storage_uri=uri3))
        assert await agg.send_pending_srs() == 0
        await apply_events(agg, prediction(sop3, 0.04, study=study))
        await asyncio.sleep(settle + 0.2)
        assert await agg.send_pending_srs() == 0
        # URGENT is not held.
        await apply_events(agg, received(sop4, study, storage_uri=uri4), prediction(sop4, 0.98, study=study))
        assert await agg.send_pending_srs() == 1
        async with agg.sessions() as s:
            deliveries = (await s.scalars(select(SrDelivery).order_by(SrDelivery.id))).all()
    finally:
        await agg.engine.dispose()
    assert [d.status for d in deliveries].count("sent") == 2
    assert all(d.dataset is None for d in deliveries if d.status == "superseded")
    healthy, urgent = srs_in_pacs(orthanc)
    assert "Likely healthy" in flag_of(healthy) and "URGENT" in flag_of(urgent)
    assert refs(urgent["PredecessorDocumentsSequence"]) == {
        (study, healthy["SeriesInstanceUID"], BASIC_TEXT_SR, healthy["SOPInstanceUID"])
    }
    assert healthy["CompletionFlag"] == "COMPLETE"


async def test_a_queued_sr_is_frozen_so_a_retry_sends_the_same_content(
    orthanc: Orthanc, shared_data: Path, tmp_path: Path
) -> None:
    study, [(sop, uri, _)] = study_files(shared_data, tmp_path, 1)
    agg = await make_aggregator(orthanc, tmp_path, settle_s=0)
    pacs = agg.destination
    try:
        await apply_events(agg, received(sop, study, storage_uri=uri), prediction(sop, 0.95, study=study))
        agg.destination = Destination("127.0.0.1", 9, "NOBODY")  # the PACS is down: the SR waits
        assert await agg.send_pending_srs() == 0
        # Meanwhile the crowd changes the score (a new revision, the same flag: no new SR).
        await apply_events(agg, judgment(sop, "j1", True, study=study), judgment(sop, "j2", True, study=study))
        agg.destination = pacs
        assert await agg.send_pending_srs() == 1
        assert await agg.send_pending_srs() == 0
        async with agg.sessions() as s:
            deliveries = (await s.scalars(select(SrDelivery))).all()
    finally:
        await agg.engine.dispose()
    (delivery,) = deliveries
    assert delivery.revision == 1 and delivery.status == "sent" and delivery.attempts == 2
    (sr,) = srs_in_pacs(orthanc)
    assert sr["SOPInstanceUID"] == delivery.sop_uid == sr_uids(study, 1)[1]
    texts = [i["TextValue"] for i in sr["ContentSequence"]]
    assert "0.950" in texts, texts  # the score as queued, not the crowd-moved one
    assert any("revision 1" in t for t in texts)
