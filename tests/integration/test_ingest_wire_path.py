"""C-STORE requests taken past pynetdicom's DIMSE layer (wire.py `Wire(on_store=...)`): the response a
real SCU gets is the one pynetdicom's Storage service class would send (message ID, SOP class and
instance, status, error comment), what does not fit the fast path still goes through pynetdicom, and
a peer that breaks the message sequence is aborted without leaving anything behind."""

from __future__ import annotations

import struct
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE, evt
from pynetdicom.dsutils import decode
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, DigitalXRayImageStorageForPresentation

from harness.rabbitmq import RabbitNode
from harness.system_dicom import make_study_set
from harness.wait import eventually_async
from services.ingest.app import IngestService
from services.ingest.scp import REJECTED, STORE_PATHS
from tests.support.dicom_raw import RawAssociation, c_store_command, dx_header, p_data
from tests.support.ingest_service import AE_TITLE, call, ingest_settings


def _paths() -> tuple[float, float]:
    return STORE_PATHS.labels("wire")._value.get(), STORE_PATHS.labels("dimse")._value.get()


def _send(port: int, datasets: list[tuple[pydicom.Dataset, int]], max_pdu: int = 16382) -> tuple[list[Any], list[int]]:
    """C-STORE each (dataset, message ID) with pynetdicom's SCU (receiving PDUs of at most max_pdu
    bytes); the C-STORE-RSP messages received, and the length of every P-DATA-TF PDU received."""
    received: list[Any] = []
    lengths: list[int] = []

    def on_recv(event: evt.Event) -> None:
        received.append(event.message.command_set)

    def on_pdu(event: evt.Event) -> None:
        if isinstance(event.pdu, P_DATA_TF):
            lengths.append(event.pdu.pdu_length)

    scu = AE(ae_title="WIRESCU")
    for ds, _ in datasets:
        scu.add_requested_context(ds.SOPClassUID, [ds.file_meta.TransferSyntaxUID])
    handlers = [(evt.EVT_DIMSE_RECV, on_recv), (evt.EVT_PDU_RECV, on_pdu)]
    assoc = scu.associate("127.0.0.1", port, ae_title=AE_TITLE, max_pdu=max_pdu, evt_handlers=handlers)
    assert assoc.is_established
    try:
        for ds, message_id in datasets:
            assoc.send_c_store(ds, msg_id=message_id)
    finally:
        assoc.release()
    return received, lengths


@pytest.mark.parametrize("max_pdu", [16382, 64], ids=["one-pdu", "peer-pdus-too-small-for-the-response"])
async def test_the_fast_path_answers_as_pynetdicom_would(
    tmp_path: Path, rabbit: RabbitNode, broker: object, shared_data: Path, max_pdu: int
) -> None:
    """With PDUs too small for the response, pynetdicom's DIMSE provider fragments it."""
    dx = pydicom.dcmread(make_study_set(shared_data, tmp_path / "in", 1)[0].path)
    ct = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    assert ct.SOPClassUID == CTImageStorage
    service = await IngestService(ingest_settings(tmp_path, rabbit.url)).start(http=False)
    try:
        wire_before, dimse_before = _paths()
        responses, pdu_lengths = await call(_send, service.dicom_port, [(dx, 42), (ct, 7)], max_pdu)
        assert _paths() == (wire_before + 2, dimse_before)  # both taken past pynetdicom's DIMSE layer
        assert max(pdu_lengths) <= max_pdu  # the peer's maximum PDU length is honoured
        # one P-DATA-TF per response when it fits (sent by ingest), several when it does not (pynetdicom)
        assert (len(pdu_lengths) == 2) if max_pdu > 1000 else (len(pdu_lengths) > 2)
        stored, refused = responses
        assert stored.CommandField == 0x8001 and refused.CommandField == 0x8001  # C-STORE-RSP
        assert stored.MessageIDBeingRespondedTo == 42 and refused.MessageIDBeingRespondedTo == 7
        assert (stored.AffectedSOPClassUID, stored.AffectedSOPInstanceUID) == (dx.SOPClassUID, dx.SOPInstanceUID)
        assert (refused.AffectedSOPClassUID, refused.AffectedSOPInstanceUID) == (ct.SOPClassUID, ct.SOPInstanceUID)
        assert stored.Status == 0x0000 and "ErrorComment" not in stored
        assert (refused.Status, refused.ErrorComment) == (0x0122, "unsupported_sop_class")
        assert stored.CommandDataSetType == 0x0101 and refused.CommandDataSetType == 0x0101
        assert len(list(service.store.root.rglob("*.dcm"))) == 1
    finally:
        await service.stop()


def _read_pdu(assoc: RawAssociation) -> tuple[int, bytes]:
    pdu_type, _, length = struct.unpack(">BBL", assoc._recv_exact(6))
    return pdu_type, assoc._recv_exact(length)


def _store_in_two_command_fragments(port: int) -> Any:
    """A whole, valid C-STORE whose command set comes in two fragments (allowed, unusual): the
    response's command set."""
    sop_uid, header = dx_header(64 * 64 * 2, rows=64, columns=64)
    command = c_store_command(DigitalXRayImageStorageForPresentation, sop_uid, message_id=5)
    with RawAssociation(port, AE_TITLE) as assoc:
        assoc.sock.sendall(
            p_data(3, 0x01, command[:20]) + p_data(3, 0x03, command[20:]) + p_data(3, 0x02, header + bytes(64 * 64 * 2))
        )
        pdu_type, body = _read_pdu(assoc)
        assert pdu_type == 0x04  # P-DATA-TF
        (item_len,) = struct.unpack_from(">L", body, 0)
        assert body[5] & 0x03 == 0x03  # one last command fragment
        return decode(BytesIO(body[6 : 4 + item_len]), True, True)


async def test_a_command_in_two_fragments_goes_through_pynetdicom(
    tmp_path: Path, rabbit: RabbitNode, broker: object
) -> None:
    service = await IngestService(ingest_settings(tmp_path, rabbit.url)).start(http=False)
    try:
        wire_before, dimse_before = _paths()
        rsp = await call(_store_in_two_command_fragments, service.dicom_port)
        assert (rsp.Status, rsp.MessageIDBeingRespondedTo) == (0x0000, 5)
        assert _paths() == (wire_before, dimse_before + 1)
        assert len(list(service.store.root.rglob("*.dcm"))) == 1
    finally:
        await service.stop()


def _command_inside_a_data_set(port: int) -> bool:
    """A C-STORE command, half its data set, then another command: the SCP ends the association."""
    sop_uid, header = dx_header(64 * 64 * 2, rows=64, columns=64)
    first = c_store_command(DigitalXRayImageStorageForPresentation, sop_uid, message_id=1)
    second = c_store_command(DigitalXRayImageStorageForPresentation, "1.2.3.4.5", message_id=2)
    with RawAssociation(port, AE_TITLE) as assoc:
        assoc.sock.sendall(p_data(3, 0x03, first) + p_data(3, 0x00, header) + p_data(3, 0x03, second))
        try:
            pdu_type, _ = _read_pdu(assoc)
        except ConnectionError:
            return True
        return pdu_type == 0x07  # A-ABORT


async def test_a_command_before_the_data_set_is_complete_aborts(
    tmp_path: Path, rabbit: RabbitNode, broker: object
) -> None:
    service = await IngestService(ingest_settings(tmp_path, rabbit.url)).start(http=False)
    try:
        before = REJECTED.labels("cannot_parse")._value.get()
        assert await call(_command_inside_a_data_set, service.dicom_port)
        assert REJECTED.labels("cannot_parse")._value.get() == before + 1
        assert service.scp is not None
        await eventually_async(lambda: not list(service.scp.spool_dir.glob("*.part")), 10, 0.05)
        assert not list(service.store.root.rglob("*.dcm"))
    finally:
        await service.stop()


async def test_the_data_set_on_its_context_only(tmp_path: Path, rabbit: RabbitNode, broker: object) -> None:
    """Data-set fragments on another presentation context than the C-STORE's: aborted, nothing stored."""

    def send(port: int) -> bool:
        sop_uid, header = dx_header(64 * 64 * 2, rows=64, columns=64)
        command = c_store_command(DigitalXRayImageStorageForPresentation, sop_uid)
        with RawAssociation(port, AE_TITLE) as assoc:
            assoc.sock.sendall(p_data(3, 0x03, command) + p_data(3, 0x00, header) + p_data(1, 0x02, b"\x00\x00"))
            try:
                return _read_pdu(assoc)[0] == 0x07
            except ConnectionError:
                return True

    service = await IngestService(ingest_settings(tmp_path, rabbit.url)).start(http=False)
    try:
        assert await call(send, service.dicom_port)
        assert not list(service.store.root.rglob("*.dcm"))
    finally:
        await service.stop()
