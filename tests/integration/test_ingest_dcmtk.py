"""dcmtk's echoscu / storescu (not our SCU) against the running ingest: real files in, events out."""

from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import urlparse

import pydicom
import pytest

from harness.dicom_peers import ECHOSCU, STORESCU, STORESCU_SYNTAX_FLAGS
from harness.rabbitmq import RabbitNode
from services.ingest.app import IngestService
from services.ingest.tools.make_dicom import TRANSFER_SYNTAXES, make_dicom_file
from tests.support.ingest_service import AE_TITLE, drain, ingest_service_fixture, run, sop_uids  # noqa: F401


def _check_event(event, source: Path) -> None:  # type: ignore[no-untyped-def]
    src = pydicom.dcmread(source)
    ref = event.image
    assert ref.sop_instance_uid == src.SOPInstanceUID
    assert ref.study_instance_uid == src.StudyInstanceUID
    assert ref.series_instance_uid == src.SeriesInstanceUID
    assert ref.sop_class_uid == src.SOPClassUID
    stored = Path(urlparse(ref.storage_uri).path)
    data = stored.read_bytes()
    assert ref.sha256 == hashlib.sha256(data).hexdigest()
    assert stored.name == f"{ref.sha256}.dcm"
    kept = pydicom.dcmread(stored)
    assert kept.file_meta.TransferSyntaxUID == src.file_meta.TransferSyntaxUID
    assert kept.PixelData == src.PixelData  # bit-exact, in the sender's own transfer syntax
    assert event.transfer_syntax_uid == src.file_meta.TransferSyntaxUID
    assert event.rows == src.Rows and event.columns == src.Columns


async def test_echoscu_and_storescu_shared_files(
    ingest_service: IngestService, rabbit: RabbitNode, shared_data: Path
) -> None:
    port = ingest_service.dicom_port
    echo = await run([ECHOSCU, "-aet", "MODALITY1", "-aec", AE_TITLE, "127.0.0.1", str(port)])
    assert echo.returncode == 0, echo.stderr

    files = sorted((shared_data / "dicom").glob("*.dcm"))
    assert len(files) == 12
    res = await run([STORESCU, "-aet", "MODALITY1", "-aec", AE_TITLE, "-xy", "127.0.0.1", str(port), *map(str, files)])
    assert res.returncode == 0, res.stderr

    events = await drain(rabbit.url, "inference.images", expected=len(files))
    by_uid = {payload.image.sop_instance_uid: (msg, payload) for msg, payload in events}
    assert len(events) == len(files) == len(by_uid)
    for f in files:
        uid = pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
        msg, payload = by_uid[uid]
        _check_event(payload, f)
        assert payload.triage_eligible, payload.not_triaged_reason
        assert payload.calling_ae_title == "MODALITY1"
        assert msg.message_id == f"ingest:{uid}"
        assert msg.correlation_id == uid
        assert msg.headers["x-correlation-id"] == uid
        # PHI never travels in events
        assert b"Sample^Patient" not in msg.body and b"KERMANY-" not in msg.body


@pytest.mark.parametrize("bits", [8, 16])
async def test_storescu_every_transfer_syntax(
    ingest_service: IngestService, rabbit: RabbitNode, shared_data: Path, tmp_path: Path, bits: int
) -> None:
    image = sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("*.jpeg"))[bits]
    made: dict[str, Path] = {}
    for name in TRANSFER_SYNTAXES:
        if name == "jpeg-baseline" and bits != 8:
            continue
        photometric = "MONOCHROME1" if name in ("rle", "jpeg2000") else "MONOCHROME2"
        made[name] = make_dicom_file(image, tmp_path / "in", transfer_syntax=name, bits=bits, photometric=photometric)

    port = ingest_service.dicom_port
    for name, path in made.items():
        ts = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        if ts not in STORESCU_SYNTAX_FLAGS:
            # dcmtk's storescu cannot propose JPEG lossless process 14 (non-SV1) from the command
            # line: use a storescu configuration profile proposing exactly that syntax.
            cfg = tmp_path / "storescu.cfg"
            cfg.write_text(
                "[[TransferSyntaxes]]\n[Lossless14]\nTransferSyntax1 = " + ts + "\n"
                "[[PresentationContexts]]\n[DX]\nPresentationContext1 = "
                f"{pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID}\\Lossless14\n"
                "[[Profiles]]\n[Default]\nPresentationContexts = DX\n"
            )
            flags: tuple[str, ...] = ("-xf", str(cfg), "Default")
        else:
            flags = STORESCU_SYNTAX_FLAGS[ts]
        res = await run([STORESCU, "-aet", "MODALITY2", "-aec", AE_TITLE, *flags, "127.0.0.1", str(port), str(path)])
        assert res.returncode == 0, f"{name}: {res.stderr}"

    events = await drain(rabbit.url, "inference.images", expected=len(made))
    assert sorted(sop_uids(events)) == sorted(pydicom.dcmread(p).SOPInstanceUID for p in made.values())
    by_uid = {payload.image.sop_instance_uid: payload for _, payload in events}
    for name, path in made.items():
        payload = by_uid[pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID]
        _check_event(payload, path)
        assert payload.triage_eligible, f"{name}: {payload.not_triaged_reason}"
        assert payload.patient_age_years == 5 and not payload.outside_intended_use
