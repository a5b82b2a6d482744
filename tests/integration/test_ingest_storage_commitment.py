"""Storage commitment (issue 23, item 4) with a real Orthanc as the requestor: Orthanc pushes a
study with "StorageCommitment": true, we answer its N-ACTION and send the N-EVENT-REPORT on a new
association to Orthanc's port (PT_INGEST_COMMITMENT_PEERS); Orthanc records the commitment as
Success. Before: no Storage Commitment context, the push ended in HTTP 500 after the images were
stored. And a pynetdicom requestor that keeps its association open asks about one stored and one
unknown instance: the stored one is committed, the other listed as failed (0x0112)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt

from harness.dicom_peers import Orthanc, orthanc_fixture  # noqa: F401
from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.ingest.app import IngestService
from services.ingest.commitment import STORAGE_COMMITMENT_INSTANCE, STORAGE_COMMITMENT_PUSH
from services.ingest.tools.make_dicom import make_dicom_file
from tests.support.ingest_service import AE_TITLE, call, ingest_settings


def two_images(shared_data: Path, tmp_path: Path) -> list[Path]:
    jpegs = sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("person1_*.jpeg"))[:2]
    return [make_dicom_file(j, tmp_path / "src", transfer_syntax="explicit") for j in jpegs]


async def test_orthanc_push_with_storage_commitment_is_committed(
    orthanc: Orthanc, rabbit: RabbitNode, shared_data: Path, tmp_path: Path
) -> None:
    settings = ingest_settings(tmp_path, rabbit.url, commitment_peers=f"{orthanc.aet}=127.0.0.1:{orthanc.dicom_port}")
    service = await IngestService(settings).start()
    try:
        files = two_images(shared_data, tmp_path)
        answers = [await call(orthanc.upload, f) for f in files]
        study = answers[0]["ParentStudy"]
        await call(orthanc.add_modality, "pt", AE_TITLE, "127.0.0.1", service.dicom_port)
        body = {"Resources": [study], "Synchronous": True, "StorageCommitment": True, "Timeout": 60}
        job = await call(orthanc.request, "POST", "/modalities/pt/store", body)
        assert job["InstancesCount"] == 2 and job["FailedInstancesCount"] == 0
        transaction = job["StorageCommitmentTransactionUID"]

        async def report() -> dict[str, Any] | None:
            r = await call(orthanc.get, f"/storage-commitment/{transaction}")
            return r if r.get("Status") != "Pending" else None

        result = await eventually_async(report, 30, 0.2, what="Orthanc's storage commitment report")
        assert result["Status"] == "Success", result
        uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files}
        assert {s["SOPInstanceUID"] for s in result["Success"]} == uids
        assert not result["Failures"]
    finally:
        await service.stop()


async def test_commitment_only_for_instances_stored(rabbit: RabbitNode, shared_data: Path, tmp_path: Path) -> None:
    service = await IngestService(ingest_settings(tmp_path, rabbit.url)).start()
    try:
        stored = two_images(shared_data, tmp_path)[0]
        ds = pydicom.dcmread(stored)
        reports: list[Dataset] = []
        got = threading.Event()

        def on_report(event: Any) -> tuple[int, None]:
            reports.append(event.event_information)
            got.set()
            return 0x0000, None

        def exchange() -> int:
            ae = AE(ae_title="COMMITSCU")
            ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
            ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
            assoc = ae.associate(
                "127.0.0.1", service.dicom_port, ae_title=AE_TITLE, evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)]
            )
            assert assoc.is_established
            try:
                assert assoc.send_c_store(ds).Status == 0x0000
                info = Dataset()
                info.TransactionUID = generate_uid()
                info.ReferencedSOPSequence = []
                for uid in (str(ds.SOPInstanceUID), generate_uid()):
                    item = Dataset()
                    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = ds.SOPClassUID, uid
                    info.ReferencedSOPSequence.append(item)
                status, _ = assoc.send_n_action(info, 1, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE)
                assert got.wait(30), "no N-EVENT-REPORT on the open association"
                return int(status.Status)
            finally:
                assoc.release()

        assert await asyncio.to_thread(exchange) == 0x0000
        (report,) = reports
        assert [i.ReferencedSOPInstanceUID for i in report.ReferencedSOPSequence] == [ds.SOPInstanceUID]
        (failed,) = report.FailedSOPSequence
        assert failed.FailureReason == 0x0112 and failed.ReferencedSOPInstanceUID != ds.SOPInstanceUID
    finally:
        await service.stop()
