"""`pneumotriage ingest` as a real process: env configuration, /healthz, /metrics, allowed calling AEs,
`pneumotriage send` and `make-dicom` CLIs, graceful SIGTERM and a kill -9 mid-run with nothing lost."""

from __future__ import annotations

import asyncio
import signal
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pydicom
import pytest

from harness.dicom_peers import ECHOSCU, STORESCU
from harness.processes import CLI
from harness.rabbitmq import RabbitNode
from tests.support.ingest_service import AE_TITLE, IngestProcess, drain, run


@pytest.fixture
async def ingest_process(tmp_path: Path, rabbit: RabbitNode, broker: object) -> AsyncIterator[IngestProcess]:
    proc = await IngestProcess(tmp_path / "var", rabbit.url, PT_INGEST_ALLOWED_CALLING_AES="MODALITY,PT_SEND").start()
    try:
        yield proc
    finally:
        if proc.process.alive():
            proc.stop(signal.SIGKILL)


async def test_service_process_cli_health_metrics_and_sigterm(
    ingest_process: IngestProcess, rabbit: RabbitNode, shared_data: Path, tmp_path: Path
) -> None:
    # make-dicom CLI: every image of a small folder, 12-bit JPEG 2000
    src = tmp_path / "jpegs"
    src.mkdir()
    for p in sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[40:45]:
        (src / p.name).symlink_to(p)
    made = await run([*CLI, "make-dicom", str(src), "--out", str(tmp_path / "dcm"), "--transfer-syntax", "jpeg2000",
                      "--bits", "12", "--age", "010Y"])  # fmt: skip
    assert made.returncode == 0, made.stderr
    files = sorted((tmp_path / "dcm").glob("*.dcm"))
    assert len(files) == 5

    port = str(ingest_process.dicom_port)
    # an AE that is not on the allow-list is rejected at association time
    denied = await run([ECHOSCU, "-aet", "INTRUDER", "-aec", AE_TITLE, "127.0.0.1", port])
    assert denied.returncode != 0
    assert (await run([ECHOSCU, "-aet", "MODALITY", "-aec", AE_TITLE, "127.0.0.1", port])).returncode == 0
    # a wrong called AE title is rejected too
    assert (await run([ECHOSCU, "-aet", "MODALITY", "-aec", "SOMEONE_ELSE", "127.0.0.1", port])).returncode != 0

    # send CLI: exit 0 and a summary; then a file that fails -> exit 1
    sent = await run([*CLI, "send", str(tmp_path / "dcm"), "--port", port, "--called-ae", AE_TITLE])
    assert sent.returncode == 0, sent.stdout + sent.stderr
    assert "0x0000" in sent.stdout and "5" in sent.stdout
    bad = tmp_path / "bad"
    bad.mkdir()
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    del ds.PixelData
    ds.save_as(bad / "no-pixels.dcm", enforce_file_format=True)
    failed = await run([*CLI, "send", str(bad), "--port", port, "--called-ae", AE_TITLE])
    assert failed.returncode == 1
    assert "0xA900" in failed.stdout

    events = await drain(rabbit.url, "inference.images", expected=5)
    expected = sorted(pydicom.dcmread(f).SOPInstanceUID for f in files)
    assert sorted(p.image.sop_instance_uid for _, p in events) == expected
    assert all(p.patient_age_years == 10 and p.calling_ae_title == "PT_SEND" for _, p in events)

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{ingest_process.http_port}") as client:
        health = await client.get("/healthz", timeout=10)
        assert health.status_code == 200
        checks = health.json()["checks"]
        assert checks["dicom"] and checks["database"] and checks["store"]["ok"] and checks["broker"]["connected"]
        metrics = (await client.get("/metrics", timeout=10)).text
    assert 'pt_ingest_received_total{outcome="accepted"} 5.0' in metrics
    assert 'pt_ingest_rejected_total{reason="missing_pixel_data"} 1.0' in metrics
    stored_bytes = sum(p.stat().st_size for p in (tmp_path / "var" / "store").rglob("*.dcm"))
    assert f"pt_ingest_bytes_total {float(stored_bytes)}" in metrics
    assert "pt_ingest_store_seconds_count 6.0" in metrics
    assert 'pt_outbox_backlog{service="ingest"}' in metrics

    assert await asyncio.to_thread(ingest_process.stop, signal.SIGTERM) == 0
    log = ingest_process.log.read_text()
    assert "ingest stopping" in log
    assert "KERMANY-" not in log and "Kermany^" not in log  # no PHI in the logs


async def test_kill_9_mid_run_loses_no_acknowledged_image(
    tmp_path: Path, rabbit: RabbitNode, broker: object, shared_data: Path
) -> None:
    from services.ingest.tools.make_dicom import make_dicom_file

    images = sorted((shared_data / "kermany224" / "train" / "PNEUMONIA").glob("*.jpeg"))[100:180]
    files = [make_dicom_file(p, tmp_path / "in", transfer_syntax="explicit", bits=16, size=512) for p in images]
    data_dir = tmp_path / "var"
    proc = await IngestProcess(data_dir, rabbit.url).start()
    port = str(proc.dicom_port)
    cmd = [STORESCU, "-v", "-aet", "KILLTEST", "-aec", AE_TITLE, "127.0.0.1", port, *map(str, files)]
    pipe, merged = asyncio.subprocess.PIPE, asyncio.subprocess.STDOUT
    sender = await asyncio.create_subprocess_exec(*cmd, stdout=pipe, stderr=merged)
    assert sender.stdout is not None
    # storescu -v prints "Received Store Response (Success)" for each acknowledged instance, in order
    acked = 0
    while acked < 15:
        line = (await asyncio.wait_for(sender.stdout.readline(), timeout=120)).decode()
        assert line, "storescu ended before the kill"
        acked += "Received Store Response (Success)" in line
    proc.stop(signal.SIGKILL)
    rest = (await sender.communicate())[0].decode()
    acked += rest.count("Received Store Response (Success)")
    assert acked < len(files), "the kill should land mid-run"
    acked_uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in files[:acked]}

    # restart on the same data dir, then the sender retries everything
    proc2 = await IngestProcess(data_dir, rabbit.url).start()
    try:
        retry = await run([STORESCU, "-aet", "KILLTEST", "-aec", AE_TITLE, "127.0.0.1", str(proc2.dicom_port)]
                          + [str(f) for f in files])  # fmt: skip
        assert retry.returncode == 0, retry.stderr
        events = await drain(rabbit.url, "inference.images", expected=len(files), timeout=120, settle=3.0)
    finally:
        proc2.stop()
    counts = Counter(p.image.sop_instance_uid for _, p in events)
    assert acked_uids <= set(counts)  # every acknowledged image is there
    assert len(counts) == len(files)
    # at-least-once: events the relay had published but not yet marked when it was killed are sent
    # again — with the same message_id, which is what consumers deduplicate on
    assert {m.message_id for m, _ in events} == {f"ingest:{uid}" for uid in counts}
    assert all(m.message_id == f"ingest:{p.image.sop_instance_uid}" for m, p in events)
