"""A real PACS (Orthanc) with our SCP declared as a modality forwards a whole study to us."""

from __future__ import annotations

from pathlib import Path

import pydicom

from harness.dicom_peers import Orthanc, orthanc_fixture  # noqa: F401
from harness.rabbitmq import RabbitNode
from services.ingest.app import IngestService
from services.ingest.tools.make_dicom import make_dicom_file, patient_key
from tests.support.ingest_service import AE_TITLE, call, drain, ingest_service_fixture  # noqa: F401


async def test_orthanc_forwards_a_study(
    ingest_service: IngestService, orthanc: Orthanc, rabbit: RabbitNode, shared_data: Path, tmp_path: Path
) -> None:
    # one patient with several images -> one study in Orthanc (make-dicom groups studies per patient)
    images = sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("person1_*.jpeg"))
    if len(images) < 2:
        by_patient: dict[str, list[Path]] = {}
        for p in sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("person*.jpeg")):
            by_patient.setdefault(patient_key(p), []).append(p)
        images = next(v for v in by_patient.values() if len(v) >= 2)
    files = [
        make_dicom_file(images[0], tmp_path, transfer_syntax="jpeg2000", bits=12),
        make_dicom_file(images[1], tmp_path, transfer_syntax="explicit", bits=16, photometric="MONOCHROME1"),
        make_dicom_file(images[0], tmp_path, transfer_syntax="explicit", view="LL"),  # stored, not triaged
    ]
    answers = [await call(orthanc.upload, f) for f in files]
    studies = {a["ParentStudy"] for a in answers}
    assert len(studies) == 1, "make-dicom must put one patient's images in one study"

    await call(orthanc.add_modality, "pt", AE_TITLE, "127.0.0.1", ingest_service.dicom_port)
    assert await call(orthanc.echo, "pt")
    job = await call(orthanc.store_to, "pt", studies.pop())
    assert job["InstancesCount"] == 3 and job["FailedInstancesCount"] == 0

    expected = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
    received = await drain(rabbit.url, "aggregator.events", expected=3)
    assert {p.image.sop_instance_uid for _, p in received} == expected
    assert len(received) == 3
    by_view = {p.view_position: p for _, p in received}
    assert by_view["LL"].triage_eligible is False
    assert "LL" in by_view["LL"].not_triaged_reason
    assert all(p.triage_eligible for v, p in by_view.items() if v == "PA")
    assert {p.calling_ae_title for _, p in received} == {"ORTHANC"}
    # inference gets the same events (it skips triage_eligible=false itself)
    assert len(await drain(rabbit.url, "inference.images", expected=3)) == 3
