"""PT_INGEST_OUT_OF_SCOPE (issue 23, item 5): a real Orthanc pushes a study that mixes a DX image
with a CT (pydicom's CT_small.dcm put into the same study), as a forward-all routing rule does.
refuse: the CT is answered 0x0122 and Orthanc's job fails; accept-and-discard: the job succeeds,
the DX is stored and triaged, the CT is answered success but not stored, counted and recorded as
discarded with its reason."""

from __future__ import annotations

import urllib.error
from pathlib import Path

import pydicom
import pytest
from prometheus_client import REGISTRY
from pydicom.data import get_testdata_file
from sqlalchemy import select

from harness.dicom_peers import Orthanc, orthanc_fixture  # noqa: F401
from harness.rabbitmq import RabbitNode
from services.core.contracts import ImageReceived, ImageRejected
from services.ingest.app import IngestService
from services.ingest.models import Instance, Rejection
from services.ingest.tools.make_dicom import make_dicom_file
from tests.support.ingest_service import AE_TITLE, call, drain, ingest_settings


def _mixed_study(shared_data: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A DX chest image (make-dicom) and a CT moved into its study (same patient and study UID)."""
    image = sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("person*.jpeg"))[0]
    dx_path = make_dicom_file(image, tmp_path)
    dx = pydicom.dcmread(dx_path, stop_before_pixels=True)
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    for keyword in ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "StudyDate", "StudyID"):
        if keyword in dx:
            setattr(ct, keyword, dx.data_element(keyword).value)
    ct.SeriesInstanceUID = pydicom.uid.generate_uid()
    ct.SOPInstanceUID = pydicom.uid.generate_uid()
    ct.file_meta.MediaStorageSOPInstanceUID = ct.SOPInstanceUID
    ct_path = tmp_path / "ct.dcm"
    ct.save_as(ct_path, enforce_file_format=True)
    return dx_path, ct_path


def _discarded(reason: str) -> float:
    return REGISTRY.get_sample_value("pt_ingest_discarded_total", {"reason": reason}) or 0.0


@pytest.mark.parametrize("policy", ["refuse", "accept-and-discard"])
async def test_a_push_mixing_a_ct_into_a_dx_study(
    policy: str, orthanc: Orthanc, rabbit: RabbitNode, broker: object, shared_data: Path, tmp_path: Path
) -> None:
    dx_path, ct_path = _mixed_study(shared_data, tmp_path)
    dx_uid = pydicom.dcmread(dx_path, stop_before_pixels=True).SOPInstanceUID
    ct_uid = pydicom.dcmread(ct_path, stop_before_pixels=True).SOPInstanceUID
    answers = [await call(orthanc.upload, f) for f in (dx_path, ct_path)]
    studies = {a["ParentStudy"] for a in answers}
    assert len(studies) == 1, "the CT must be in the DX image's study"

    service = await IngestService(ingest_settings(tmp_path, rabbit.url, out_of_scope=policy)).start()
    try:
        before = _discarded("unsupported_sop_class")
        await call(orthanc.add_modality, "pt", AE_TITLE, "127.0.0.1", service.dicom_port)
        if policy == "refuse":
            # Orthanc's job fails on the one refused instance (HTTP 500 for a synchronous job)
            with pytest.raises(urllib.error.HTTPError):
                await call(orthanc.store_to, "pt", studies.pop(), 60)
        else:
            job = await call(orthanc.store_to, "pt", studies.pop(), 60)
            assert job["InstancesCount"] == 2 and job["FailedInstancesCount"] == 0, job

        # every C-STORE is answered (after its commit) once the synchronous job has ended
        async with service.sessions() as s:
            stored = set(await s.scalars(select(Instance.sop_instance_uid)))
            rows = list(await s.scalars(select(Rejection)))
        assert [(r.sop_instance_uid, r.reason_code) for r in rows] == [(ct_uid, "unsupported_sop_class")]
        if policy == "refuse":
            # Orthanc stops its job at the refusal: the DX arrived only if it was sent before the CT
            assert stored <= {dx_uid}
        else:
            assert stored == {dx_uid}  # the CT is not stored
        events = [p for _, p in await drain(rabbit.url, "aggregator.events", expected=1 + len(stored))]
        received = [p for p in events if isinstance(p, ImageReceived)]
        rejected = [p for p in events if isinstance(p, ImageRejected)]
        assert [p.image.sop_instance_uid for p in received] == sorted(stored)
        assert all(p.triage_eligible for p in received)  # the DX goes on to be flagged
        assert [p.image.sop_instance_uid for p in rejected] == [ct_uid]
        assert rejected[0].reason_code == "unsupported_sop_class" and rejected[0].stored is False
        study_uid = pydicom.dcmread(dx_path, stop_before_pixels=True).StudyInstanceUID
        # a discard is listed under the study it came with; a refusal names no study (as before)
        assert rejected[0].image.study_instance_uid == ("" if policy == "refuse" else study_uid)
        if policy == "refuse":
            assert rejected[0].dicom_status == 0x0122 and rows[0].dicom_status == 0x0122
            assert _discarded("unsupported_sop_class") == before
        else:
            assert rejected[0].dicom_status == 0 and rows[0].dicom_status == 0
            assert rows[0].reason.startswith("discarded (PT_INGEST_OUT_OF_SCOPE=accept-and-discard)")
            assert _discarded("unsupported_sop_class") == before + 1
        assert not list((service.store.root / ".incoming").glob("*")), "a discarded data set left a spool file"
    finally:
        await service.stop()
