"""Bad input: each broken or out-of-scope file gets the documented status and reason, and the SCP keeps serving."""

from __future__ import annotations

from pathlib import Path

import pydicom
from pynetdicom.dsutils import split_dataset

from harness.dicom_peers import ECHOSCU, STORESCU
from harness.rabbitmq import RabbitNode
from services.core.contracts import ImageReceived, ImageRejected
from services.ingest.app import IngestService
from services.ingest.scp import REJECTED
from services.ingest.tools.make_dicom import make_dicom_file
from services.ingest.tools.send import send_files
from services.ingest.wire.pixel_scan import UNDEFINED, PixelLengthScan
from tests.support.ingest_corpus import build_bad_corpus, build_fuzzed
from tests.support.ingest_service import AE_TITLE, call, drain, ingest_service_fixture, run  # noqa: F401


def _store_files(service: IngestService) -> list[Path]:
    return [p for p in service.store.root.rglob("*") if p.is_file()]


async def test_bad_corpus_gets_documented_status_and_reason(
    ingest_service: IngestService, rabbit: RabbitNode, shared_data: Path, tmp_path: Path
) -> None:
    image = sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[3]
    cases = build_bad_corpus(image, tmp_path / "corpus")
    port = ingest_service.dicom_port

    summary = await call(send_files, [c.path for c in cases], "127.0.0.1", port, AE_TITLE, "FUZZER")
    got = {r.path: r for r in summary.results}
    for case in cases:
        result = got[case.path]
        assert result.status == case.status, f"{case.name}: 0x{result.status or 0:04X} {result.comment}"
        if not case.stored:
            assert result.comment == case.reason_code, case.name

    # the SCP still answers: C-ECHO and a good image from dcmtk
    echo = await run([ECHOSCU, "-aec", AE_TITLE, "127.0.0.1", str(port)])
    assert echo.returncode == 0, echo.stderr
    good = make_dicom_file(image, tmp_path / "good")
    res = await run([STORESCU, "-aec", AE_TITLE, "127.0.0.1", str(port), str(good)])
    assert res.returncode == 0, res.stderr

    stored_cases = [c for c in cases if c.stored]
    refused = [c for c in cases if not c.stored]
    events = await drain(rabbit.url, "aggregator.events", expected=len(cases) + 1)
    rejected = [p for _, p in events if isinstance(p, ImageRejected)]
    received = [p for _, p in events if isinstance(p, ImageReceived)]
    assert len(rejected) == len(refused)
    assert sorted(e.reason_code for e in rejected) == sorted(c.reason_code for c in refused)
    assert all(not e.stored and e.dicom_status != 0 and e.reason for e in rejected)
    assert {e.dicom_status for e in rejected} == {c.status for c in refused}
    # stored-but-not-triaged images travel as ImageReceived with the reason
    not_triaged = {e.image.sop_instance_uid: e for e in received if not e.triage_eligible}
    for case in stored_cases:
        uid = pydicom.dcmread(case.path, stop_before_pixels=True).SOPInstanceUID
        assert not_triaged[uid].not_triaged_reason.startswith(f"{case.reason_code}: ")
    assert sum(e.triage_eligible for e in received) == 1

    # refused files left nothing in the store: exactly the stored ones (+ the good one), no temp files
    files = _store_files(ingest_service)
    assert len(files) == len(stored_cases) + 1
    assert not [f for f in files if f.name.startswith(".tmp")]

    # a PACS retrying the refusals gets the same answers and does not multiply events
    again = await call(send_files, [c.path for c in refused], "127.0.0.1", port, AE_TITLE, "FUZZER")
    assert [r.status for r in again.results] == [c.status for c in refused]
    assert await drain(rabbit.url, "aggregator.events", expected=0, timeout=5, settle=2.0) == []


async def test_zero_byte_file_is_not_sent_and_reported(tmp_path: Path, ingest_service: IngestService) -> None:
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    summary = await call(send_files, [empty], "127.0.0.1", ingest_service.dicom_port, AE_TITLE)
    assert summary.results[0].status is None and summary.failed


def _declares_too_much(path: Path, limit: int) -> bool:
    """True when the data set's Pixel Data element declares more than `limit` bytes, as the SCP's own
    header scan (pixel_scan.py) sees the bytes the sender streams from the file."""
    meta, offset = split_dataset(path)
    scan = PixelLengthScan(str(meta.TransferSyntaxUID))
    declared = scan.feed(path.read_bytes()[offset:])
    return declared is not None and declared != UNDEFINED and declared > limit


async def test_fuzzed_files_always_get_an_answer(
    ingest_service: IngestService, shared_data: Path, tmp_path: Path
) -> None:
    image = sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("*.jpeg"))[5]
    fuzzed = build_fuzzed(image, tmp_path / "fuzz", n=40)
    # A random byte in Pixel Data's length can make it declare gigabytes: the documented answer is an
    # A-ABORT at the element's header (docs/dicom-conformance.md), which ends the association. Those
    # files go on associations of their own; every other file gets a C-STORE status on one association.
    limit = ingest_service.settings.instance_byte_limit
    aborting = [p for p in fuzzed if _declares_too_much(p, limit)]
    answered = [p for p in fuzzed if p not in aborting]
    assert len(answered) >= 30

    summary = await call(send_files, answered, "127.0.0.1", ingest_service.dicom_port, AE_TITLE, "FUZZER")
    statuses = [r.status for r in summary.results]
    assert None not in statuses, [r.comment for r in summary.results if r.status is None]
    allowed = {0x0000, 0x0122, 0xA900, 0xC210, 0xC211, 0xC212}
    assert set(statuses) <= allowed, [
        (hex(r.status or 0), r.comment) for r in summary.results if r.status not in allowed
    ]
    for path in aborting:
        before = REJECTED.labels("image_too_large")._value.get()
        alone = await call(send_files, [path], "127.0.0.1", ingest_service.dicom_port, AE_TITLE, "FUZZER", timeout=10)
        assert alone.results[0].status is None
        assert REJECTED.labels("image_too_large")._value.get() == before + 1
    # and it still stores a good image afterwards
    good = make_dicom_file(image, tmp_path / "good", uid_salt="after-fuzz")
    after = await call(send_files, [good], "127.0.0.1", ingest_service.dicom_port, AE_TITLE)
    assert after.results[0].status == 0
