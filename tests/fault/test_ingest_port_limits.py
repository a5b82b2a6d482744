"""The DICOM port under hostile peers (issue 14 items 2 and 3): oversized PDUs and instances are
refused early without growing memory, idle sockets cannot lock modalities out, associations are
limited per peer, unknown calling AEs are logged, and one SOP instance is stored by one thread at a time."""

from __future__ import annotations

import logging
import socket
import struct
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from harness.dicom_peers import ECHOSCU
from harness.rabbitmq import RabbitNode
from harness.wait import eventually, eventually_async
from services.ingest.app import IngestService
from services.ingest.scp import REJECTED
from tests.support.dicom_raw import RawAssociation, c_store_command, dx_header, p_data
from tests.support.ingest_service import AE_TITLE, call, ingest_settings, run

GIB = 1 << 30
MIB = 1 << 20


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _rejected(code: str) -> float:
    return REJECTED.labels(code)._value.get()


def _spooled(service: IngestService) -> list[Path]:
    assert service.scp is not None
    return sorted(service.scp.spool_dir.glob("*.part"))


async def _echo_ok(port: int) -> bool:
    return (
        await run([ECHOSCU, "-aet", "ECHOER", "-aec", AE_TITLE, "-to", "20", "127.0.0.1", str(port)])
    ).returncode == 0


async def test_a_pdu_declaring_1_gib_is_aborted_before_its_body_is_read(
    tmp_path: Path, rabbit: RabbitNode, broker: object
) -> None:
    service = await IngestService(ingest_settings(tmp_path, rabbit.url)).start(http=False)
    try:
        before = _rejected("pdu_too_large")
        with await call(RawAssociation, service.dicom_port, AE_TITLE) as assoc:
            head = struct.pack(">BBL", 0x04, 0, GIB) + struct.pack(">LBB", GIB - 4, 3, 0x00)
            sent = await call(assoc.stream, head, 64 * MIB)
        assert sent is not None and sent < 8 * MIB, f"the SCP kept reading ({sent} bytes)"
        assert _rejected("pdu_too_large") == before + 1
        assert await _echo_ok(service.dicom_port)  # and it keeps serving
    finally:
        await service.stop()


async def test_pixel_data_declared_as_1_gib_is_refused_at_its_header(
    tmp_path: Path, rabbit: RabbitNode, broker: object
) -> None:
    service = await IngestService(ingest_settings(tmp_path, rabbit.url)).start(http=False)
    try:
        before = _rejected("image_too_large")
        sop_uid, header = dx_header(GIB)
        command = p_data(3, 0x03, c_store_command("1.2.840.10008.5.1.4.1.1.1.1", sop_uid))
        with await call(RawAssociation, service.dicom_port, AE_TITLE) as assoc:
            sent = await call(
                assoc.stream, command + p_data(3, 0x00, header), 64 * MIB, 64 * 1024, lambda b: p_data(3, 0x00, b)
            )
        assert sent is not None and sent < 8 * MIB, f"the SCP kept reading ({sent} bytes)"
        assert _rejected("image_too_large") == before + 1
        await eventually_async(lambda: _spooled(service) == [], 10, 0.05)
        assert not any(p.is_file() for p in service.store.root.rglob("*.dcm"))
    finally:
        await service.stop()


async def test_a_large_instance_streams_to_disk_not_to_memory(
    tmp_path: Path, rabbit: RabbitNode, broker: object
) -> None:
    service = await IngestService(ingest_settings(tmp_path, rabbit.url)).start(http=False)
    try:
        sop_uid, header = dx_header(96 * MIB, rows=6144, columns=8192)  # within the per-instance limit
        command = p_data(3, 0x03, c_store_command("1.2.840.10008.5.1.4.1.1.1.1", sop_uid))
        with await call(RawAssociation, service.dicom_port, AE_TITLE) as assoc:
            await call(
                assoc.stream, command + p_data(3, 0x00, header), 4 * MIB, 64 * 1024, lambda b: p_data(3, 0x00, b)
            )
            await eventually_async(lambda: sum(p.stat().st_size for p in _spooled(service)) >= 4 * MIB, 10, 0.05)
            rss_before = _rss()
            sent = await call(assoc.stream, b"", 64 * MIB, 64 * 1024, lambda b: p_data(3, 0x00, b))
            assert sent is None  # not refused: it is within the limits
            await eventually_async(lambda: sum(p.stat().st_size for p in _spooled(service)) >= 68 * MIB, 10, 0.05)
            grown = _rss() - rss_before
            assert grown < 24 * MIB, f"ingest memory grew {grown / MIB:.0f} MiB for 64 MiB received"
        # the peer went away mid-instance: its spool file is removed
        await eventually_async(lambda: _spooled(service) == [], 10, 0.05)
    finally:
        await service.stop()


async def test_idle_sockets_do_not_lock_a_modality_out(tmp_path: Path, rabbit: RabbitNode, broker: object) -> None:
    settings = ingest_settings(tmp_path, rabbit.url, max_associations=16, request_timeout_s=30.0)
    service = await IngestService(settings).start(http=False)
    idle: list[socket.socket] = []
    try:
        for _ in range(24):  # more than every limit: connect, send nothing
            idle.append(socket.create_connection(("127.0.0.1", service.dicom_port)))
        started = time.monotonic()
        assert await _echo_ok(service.dicom_port)
        assert time.monotonic() - started < 5.0  # not after a timeout: at once
    finally:
        for s in idle:
            s.close()
        await service.stop()


async def test_a_silent_connection_is_closed_after_the_request_timeout(
    tmp_path: Path, rabbit: RabbitNode, broker: object
) -> None:
    service = await IngestService(ingest_settings(tmp_path, rabbit.url, request_timeout_s=0.5)).start(http=False)
    try:
        sock = socket.create_connection(("127.0.0.1", service.dicom_port))
        sock.settimeout(10)
        started = time.monotonic()
        data = await call(sock.recv, 1)
        assert data in (b"", b"\x07")  # closed (or A-ABORT) without our sending anything
        assert time.monotonic() - started < 5.0
        sock.close()
    finally:
        await service.stop()


async def test_associations_are_limited_per_peer(tmp_path: Path, rabbit: RabbitNode, broker: object) -> None:
    settings = ingest_settings(tmp_path, rabbit.url, max_associations=8, max_associations_per_peer=2)
    service = await IngestService(settings).start(http=False)
    held = []
    try:
        scu = AE(ae_title="GREEDY")
        scu.add_requested_context(Verification)
        for _ in range(2):
            assoc = await call(scu.associate, "127.0.0.1", service.dicom_port, ae_title=AE_TITLE)
            assert assoc.is_established
            held.append(assoc)
        third = await call(scu.associate, "127.0.0.1", service.dicom_port, ae_title=AE_TITLE)
        assert third.is_rejected
        assert (await call(held[0].send_c_echo)).Status == 0
    finally:
        for assoc in held:
            await call(assoc.release)
        await service.stop()


async def test_unknown_calling_aes_are_logged(
    tmp_path: Path, rabbit: RabbitNode, broker: object, caplog: pytest.LogCaptureFixture
) -> None:
    service = await IngestService(ingest_settings(tmp_path, rabbit.url)).start(http=False)
    try:
        with caplog.at_level(logging.WARNING, logger="services.ingest.scp"):
            assert await _echo_ok(service.dicom_port)
        records = [r for r in caplog.records if getattr(r, "calling_ae", None) == "ECHOER"]
        assert records and "PT_INGEST_ALLOWED_CALLING_AES" in records[0].getMessage()
    finally:
        await service.stop()
    service = await IngestService(ingest_settings(tmp_path / "b", rabbit.url, allowed_calling_aes="CR1")).start(
        http=False
    )
    try:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="services.ingest.scp"):
            assert not await _echo_ok(service.dicom_port)
        assert any(
            getattr(r, "calling_ae", None) == "ECHOER" and "unknown calling AE" in r.getMessage()
            for r in caplog.records
        )
    finally:
        await service.stop()


async def test_a_third_sender_of_one_uid_waits_for_the_second(
    tmp_path: Path, rabbit: RabbitNode, broker: object
) -> None:
    """Three C-STOREs of the same SOP instance: never two inside the per-UID section at once."""
    service = await IngestService(ingest_settings(tmp_path, rabbit.url)).start(http=False)
    scp = service.scp
    assert scp is not None
    uid = "1.2.3.4"
    inside, most = 0, 0
    guard = threading.Lock()
    release = [threading.Event() for _ in range(3)]
    entered = [threading.Event() for _ in range(3)]

    def sender(i: int) -> None:
        nonlocal inside, most
        with scp._uid_lock(uid):
            with guard:
                inside += 1
                most = max(most, inside)
            entered[i].set()
            release[i].wait(10)
            with guard:
                inside -= 1

    try:
        threads = [threading.Thread(target=sender, args=(i,), daemon=True) for i in range(3)]
        threads[0].start()
        entered[0].wait(10)
        threads[1].start()
        eventually(lambda: scp._uid_users(uid) == 2, 10, 0.01)  # the second waits on the first's lock
        release[0].set()
        entered[1].wait(10)  # the first left; the second holds the lock
        threads[2].start()
        eventually(lambda: scp._uid_users(uid) == 2 or entered[2].is_set(), 10, 0.01)
        assert not entered[2].is_set(), "the third sender ran beside the second"
        release[1].set()
        release[2].set()
        for t in threads:
            t.join(10)
        assert most == 1
        assert scp._uid_users(uid) == 0  # and nothing is left behind
    finally:
        for e in release:
            e.set()
        await service.stop()
