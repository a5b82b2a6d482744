"""Issue 22's wire-layer defects, each reproduced as it was reported (every test here failed on
e0b5246): a file spliced from two C-STOREs, stalled and idle peers locking modalities out, a DX
instance on the CT context stored, a pynetdicom traceback at a peer's will, an empty-PDV flood, and a
re-used SOP Instance UID with other content silently dropped."""

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

from harness.rabbitmq import RabbitNode
from harness.wait import eventually, eventually_async
from services.ingest.app import IngestService
from services.ingest.scp import REJECTED
from tests.support.dicom_raw import associate_rq
from tests.support.ingest_service import AE_TITLE, call, ingest_settings
from tests.support.wire_fuzz import (
    CONTEXTS,
    CT_CX,
    DX,
    DX_CX,
    ECHO_CX,
    Step,
    dx_dataset,
    echo_command,
    pdu_of,
    play,
    store_command,
)


def _rejected(code: str) -> float:
    return REJECTED.labels(code)._value.get()


def _stored(service: IngestService) -> list[Path]:
    return sorted(service.store.root.rglob("*.dcm"))


@pytest.fixture
async def ingest(tmp_path: Path, rabbit: RabbitNode, broker: object) -> IngestService:
    service = await IngestService(ingest_settings(tmp_path, rabbit.url)).start(http=False)
    try:
        yield service
    finally:
        await service.stop()


# --- item 1: one C-STORE, one file ---------------------------------------------------------------
@pytest.mark.parametrize("fast_path", [True, False], ids=["fast-path", "pynetdicom-path"])
async def test_a_second_c_store_inside_the_first_ones_data_set_is_never_spliced(
    tmp_path: Path, rabbit: RabbitNode, broker: object, fast_path: bool
) -> None:
    """C-STORE #1 (patient A), its command in two PDVs and half its data set, then C-STORE #2
    (patient B, no patient elements) whole: before, #2 was answered 0x0000 and the stored file held
    A's elements followed by B's (the worklist showed B's study under A's name). Now the association
    is aborted at #2's command and nothing is stored."""
    import random

    rng = random.Random(22)
    a_uid, b_uid = "1.2.826.0.1.3680043.9.7433.22.1", "1.2.826.0.1.3680043.9.7433.22.2"
    a_data = dx_dataset("Alpha^Patient", a_uid, rng)
    b_full = dx_dataset("", b_uid, rng)
    a_cmd = store_command(DX, a_uid, 1)
    b_cmd = store_command(DX, b_uid, 2)
    pdus = [
        pdu_of([(DX_CX, 0x01, a_cmd[:30]), (DX_CX, 0x03, a_cmd[30:])]),
        pdu_of([(DX_CX, 0x00, a_data[: len(a_data) // 2])]),
        pdu_of([(DX_CX, 0x03, b_cmd)]),
        pdu_of([(DX_CX, 0x02, b_full)]),
    ]
    before = _rejected("cannot_parse")
    settings = ingest_settings(tmp_path, rabbit.url, fast_path=fast_path)
    service = await IngestService(settings).start(http=False)
    try:
        transcript = await call(play, service.dicom_port, AE_TITLE, [Step(pdus, ends=True)])
        assert transcript.responses == []  # #2 is not answered: nothing was acknowledged
        assert transcript.end in ("aborted", "closed")
        assert _rejected("cannot_parse") == before + 1
        assert _stored(service) == []
        assert service.scp is not None
        await eventually_async(lambda: not list(service.scp.spool_dir.glob("*.part")), 10, 0.05)
    finally:
        await service.stop()


# --- items 2 and 3: stalled and idle peers never lock a modality out -------------------------------
class _Stalled:
    """An association from `source` that sends a P-DATA-TF header declaring 1000 bytes, then
    (with `trickle`) one byte every `trickle` seconds, else nothing."""

    def __init__(self, port: int, source: str, trickle: float = 0.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        self.sock.sendall(associate_rq(AE_TITLE, "STALLER", CONTEXTS))
        header = self.sock.recv(6)
        (length,) = struct.unpack(">L", header[2:6])
        got = 0
        while got < length:
            got += len(self.sock.recv(length - got))
        assert header[0] == 0x02, "association not accepted"
        self.sock.sendall(struct.pack(">BBL", 0x04, 0, 1000))
        self.ended = threading.Event()
        if trickle:
            threading.Thread(target=self._trickle, args=(trickle,), daemon=True).start()

    def _trickle(self, every: float) -> None:
        try:
            for _ in range(999):
                time.sleep(every)  # the attack's pacing, not synchronisation
                self.sock.sendall(b"\x00")
        except OSError:
            self.ended.set()

    def close(self) -> None:
        self.sock.close()


def _echo_seconds(port: int) -> float:
    """Seconds until a genuine C-ECHO (a new association) is answered; inf when refused."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    started = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title=AE_TITLE)
    try:
        if not assoc.is_established:
            return float("inf")
        status = assoc.send_c_echo()
        return time.monotonic() - started if status and status.Status == 0 else float("inf")
    finally:
        if assoc.is_established:
            assoc.release()


def _stalled_count(service: IngestService, at_least: float) -> int:
    assert service.scp is not None
    now = time.monotonic()
    return sum(
        1
        for a in service.scp.ae.active_associations
        if getattr(a, "_pt_activity", None) is not None and a._pt_activity.stalled_for(now) >= at_least
    )


async def test_sixteen_stalled_associations_do_not_lock_a_modality_out(ingest: IngestService) -> None:
    """16 associations (8 from each of two addresses: the per-peer limit is 8) send a P-DATA header
    and go silent. Before, every modality was refused for 120 s, and a second round kept them out.
    Now a genuine C-ECHO is answered within 1 s, in both rounds."""
    port = ingest.dicom_port
    for round_ in (1, 2):
        attackers = [_Stalled(port, f"127.0.0.{2 + i % 2}") for i in range(16)]
        try:
            # all 16 hold a slot, stalled past PT_INGEST_STALL_EVICT_S (1 s)
            await eventually_async(lambda: _stalled_count(ingest, 1.0) >= 16, 15, 0.1, what=f"round {round_}")
            seconds = await call(_echo_seconds, port)
            assert seconds < 1.0, f"round {round_}: C-ECHO answered after {seconds:.2f} s"
        finally:
            for attacker in attackers:
                attacker.close()


async def test_a_pdu_trickling_in_is_aborted_at_its_deadline(
    tmp_path: Path, rabbit: RabbitNode, broker: object
) -> None:
    """One byte every 0.3 s kept a PDU read (two threads, three fds, a slot) alive for ever, each
    recv well inside the network timeout; now the PDU must arrive whole within PT_INGEST_PDU_TIMEOUT_S."""
    settings = ingest_settings(tmp_path, rabbit.url, pdu_timeout_s=2.0)
    service = await IngestService(settings).start(http=False)
    try:
        before = _rejected("pdu_timeout")
        attacker = _Stalled(service.dicom_port, "127.0.0.1", trickle=0.3)
        started = time.monotonic()
        try:
            await eventually_async(lambda: _rejected("pdu_timeout") == before + 1, 15, 0.05)
            assert time.monotonic() - started < 6.0
            await eventually_async(attacker.ended.is_set, 10, 0.05)  # the SCP closed the connection
        finally:
            attacker.close()
    finally:
        await service.stop()


async def test_idle_connections_arriving_fast_do_not_refuse_genuine_echoes(ingest: IngestService) -> None:
    """20 new idle connections per second (no A-ASSOCIATE-RQ) while a modality sends 18 C-ECHOs:
    before, 15 of 18 were rejected 'local limit exceeded' (pynetdicom counted the sockets waiting out
    the request timeout); now all are answered, each within 1 s."""
    port = ingest.dicom_port
    stop = threading.Event()
    idle: list[socket.socket] = []

    def open_idle() -> None:
        while not stop.is_set():
            with __import__("contextlib").suppress(OSError):
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            time.sleep(0.05)  # the attack's pacing: 20 connections per second

    opener = threading.Thread(target=open_idle, daemon=True)
    opener.start()
    try:
        eventually(lambda: len(idle) >= 40, 10, 0.05)  # two seconds of the attack before the first echo
        times = []
        for _ in range(18):
            times.append(await call(_echo_seconds, port))
        assert all(t < 1.0 for t in times), f"C-ECHO seconds: {[round(t, 2) for t in times]}"
    finally:
        stop.set()
        opener.join(5)
        for sock in idle:
            sock.close()


# --- item 5: the SOP class of its presentation context -------------------------------------------
async def test_a_dx_instance_on_the_ct_context_is_refused_with_a900(ingest: IngestService) -> None:
    import random

    rng = random.Random(5)
    uid = "1.2.826.0.1.3680043.9.7433.22.5"
    pdus = [pdu_of([(CT_CX, 0x03, store_command(DX, uid, 7)), (CT_CX, 0x02, dx_dataset("Ct^Context", uid, rng))])]
    transcript = await call(play, ingest.dicom_port, AE_TITLE, [Step(pdus, expect_response=True)])
    assert transcript.responses == [(7, 0xA900, uid)]
    assert _stored(ingest) == []


# --- item 6: a data set before any command ---------------------------------------------------------
async def test_a_data_set_before_any_command_aborts_without_a_traceback(
    ingest: IngestService, caplog: pytest.LogCaptureFixture
) -> None:
    import random

    data = dx_dataset("No^Command", "1.2.826.0.1.3680043.9.7433.22.6", random.Random(6))
    with caplog.at_level(logging.DEBUG):
        transcript = await call(play, ingest.dicom_port, AE_TITLE, [Step([pdu_of([(DX_CX, 0x02, data)])], ends=True)])
        assert transcript.end in ("aborted", "closed")
        await eventually_async(
            lambda: any("before its command set" in str(getattr(r, "reason", "")) for r in caplog.records), 10, 0.05
        )
    assert not [r for r in caplog.records if r.exc_info], "a traceback in the log, written at the peer's will"
    assert _stored(ingest) == []


# --- item 7: a bound on PDVs ---------------------------------------------------------------------------
async def test_an_empty_pdv_flood_is_aborted(ingest: IngestService) -> None:
    """Empty PDVs cost the SCP CPU and the peer nothing: 1.75 M of them slowed a normal storescu
    from 0.06 s to 2 s. Now a message carrying far more PDVs than bytes is aborted."""
    import random

    uid = "1.2.826.0.1.3680043.9.7433.22.7"
    data = dx_dataset("Flood^Pdv", uid, random.Random(7))
    empties = [(DX_CX, 0x00, b"")] * 2000
    pdus = [pdu_of([(DX_CX, 0x03, store_command(DX, uid, 1))]), pdu_of(empties), pdu_of([(DX_CX, 0x02, data)])]
    before = _rejected("too_many_pdvs")
    transcript = await call(play, ingest.dicom_port, AE_TITLE, [Step(pdus, ends=True)])
    assert transcript.responses == [] and transcript.end in ("aborted", "closed")
    assert _rejected("too_many_pdvs") == before + 1
    # a sender that fills its PDUs is unaffected on the same service
    echo = await call(
        play, ingest.dicom_port, AE_TITLE, [Step([pdu_of([(ECHO_CX, 0x03, echo_command(3))])], expect_response=True)]
    )
    assert echo.responses[0][:2] == (3, 0x0000)


# --- item 9: one SOP Instance UID, other content ----------------------------------------------------
async def test_a_reused_uid_with_other_content_is_refused_and_the_first_kept(ingest: IngestService) -> None:
    import random

    rng = random.Random(9)
    uid = "1.2.826.0.1.3680043.9.7433.22.9"
    first, second = dx_dataset("First^Image", uid, rng), dx_dataset("Second^Image", uid, rng)
    steps = [
        Step([pdu_of([(DX_CX, 0x03, store_command(DX, uid, 1)), (DX_CX, 0x02, first)])], expect_response=True),
        Step([pdu_of([(DX_CX, 0x03, store_command(DX, uid, 2)), (DX_CX, 0x02, second)])], expect_response=True),
        Step([pdu_of([(DX_CX, 0x03, store_command(DX, uid, 3)), (DX_CX, 0x02, first)])], expect_response=True),
    ]
    transcript = await call(play, ingest.dicom_port, AE_TITLE, steps)
    assert transcript.responses == [(1, 0x0000, uid), (2, 0x0111, uid), (3, 0x0000, uid)]
    stored = _stored(ingest)
    assert len(stored) == 1 and first in stored[0].read_bytes()  # the first instance, alone
