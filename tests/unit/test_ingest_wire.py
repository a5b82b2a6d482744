"""wire.py's byte-level pieces against pydicom: the File Meta it encodes, and the Pixel Data length it
reads from the first bytes of a data set (real files from pydicom's test data, fed in odd chunks)."""

from __future__ import annotations

import io
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import RawDataElement
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom.dsutils import create_file_meta

from services.ingest.wire.pixel_scan import UNDEFINED, PixelLengthScan
from services.ingest.wire.spool import part10_header
from tests.support.dicom_raw import dx_header

TESTDATA = Path(get_testdata_file("CT_small.dcm")).parent
SCANNABLE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}


@pytest.mark.parametrize(
    ("sop_class", "sop_instance", "syntax"),
    [
        ("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.4.5", "1.2.840.10008.1.2.1"),  # odd-length UID: padded
        ("1.2.840.10008.5.1.4.1.1.7", "1.2.826.0.1.3680043.8.498.12", "1.2.840.10008.1.2.4.50"),
    ],
)
def test_part10_header_is_what_pydicom_writes(sop_class: str, sop_instance: str, syntax: str) -> None:
    expected = DicomBytesIO()
    expected.write(b"\x00" * 128 + b"DICM")
    meta = create_file_meta(
        sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(syntax)
    )
    write_file_meta_info(expected, meta)
    assert part10_header(sop_class, sop_instance, syntax) == expected.getvalue()


def _dataset_bytes(path: Path) -> tuple[str, bytes]:
    raw = path.read_bytes()
    fp = io.BytesIO(raw)
    read_preamble(fp, False)
    meta = _read_file_meta_info(fp)
    return str(meta.TransferSyntaxUID), raw[fp.tell() :]


def test_pixel_length_scan_agrees_with_pydicom_on_real_files() -> None:
    checked = 0
    for path in sorted(TESTDATA.glob("*.dcm")):
        try:
            syntax, body = _dataset_bytes(path)
            ds = pydicom.dcmread(path, defer_size=1)
        except Exception:
            continue  # files pydicom itself cannot read with file meta
        if syntax not in SCANNABLE and not UID(syntax).is_compressed:
            continue
        scan = PixelLengthScan(syntax)
        found = None
        for i in range(0, len(body), 997):  # chunks that split element headers
            found = scan.feed(body[i : i + 997])
            if found is not None or not scan.active:
                break
        elem = ds.get_item(0x7FE00010, keep_deferred=True) if "PixelData" in ds else None
        if found is not None:  # never a wrong length (a file it cannot follow: no answer, no refusal)
            assert isinstance(elem, RawDataElement), path.name
            assert found == elem.length, path.name
            checked += 1
    assert checked >= 40


def test_a_declared_gigabyte_is_seen_in_the_first_bytes() -> None:
    _, head = dx_header(1 << 30)
    scan = PixelLengthScan("1.2.840.10008.1.2.1")
    results = [scan.feed(head[i : i + 7]) for i in range(0, len(head), 7)]
    assert [r for r in results if r is not None] == [1 << 30]


def test_encapsulated_pixel_data_has_no_declared_length() -> None:
    syntax, body = _dataset_bytes(Path(get_testdata_file("JPEG2000.dcm")))
    assert PixelLengthScan(syntax).feed(body) == UNDEFINED


def test_command_fields_match_pynetdicom() -> None:
    from io import BytesIO

    from pynetdicom.dimse_messages import C_ECHO_RQ
    from pynetdicom.dimse_primitives import C_ECHO
    from pynetdicom.dsutils import decode

    from services.ingest.wire.dimse_codec import command_fields
    from tests.support.dicom_raw import c_store_command

    raw = c_store_command("1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.45")
    cmd = decode(BytesIO(raw), True, True)
    assert command_fields(raw) == {
        0x0002: str(cmd.AffectedSOPClassUID),
        0x0100: cmd.CommandField,
        0x0110: cmd.MessageID,
        0x0700: cmd.Priority,  # read by the lane rules (issue 24)
        0x0800: cmd.CommandDataSetType,
        0x1000: str(cmd.AffectedSOPInstanceUID),
    }
    echo = C_ECHO()
    echo.MessageID = 7
    msg = C_ECHO_RQ()
    msg.primitive_to_message(echo)
    echo_raw = b"".join(
        pdv[1:] for p in msg.encode_msg(1, 1 << 20) for _, pdv in p.presentation_data_value_list if pdv[0] & 1
    )
    assert command_fields(echo_raw) == {0x0100: 0x0030, 0x0110: 7, 0x0800: 0x0101}  # C-ECHO-RQ, no data set
    assert command_fields(b"\x08\x00\x16\x00\xff\xff\xff\xff") is None  # not group 0000, runs past the end


def test_a_spool_file_that_cannot_be_removed_is_removed_once_it_can(tmp_path: Path) -> None:
    """A dropped spool file whose directory is immutable at that moment (the store made unwritable
    mid-transfer) is not left behind: the next spool file created removes it."""
    import subprocess

    from harness.system_faults import chattr_available
    from services.ingest.wire.spool import UNREMOVED, Spool

    if not chattr_available(tmp_path):
        pytest.skip("optional: chattr +i is not supported on this filesystem (root ignores permission bits)")
    incoming = tmp_path / ".incoming"
    incoming.mkdir()
    stuck = Spool(incoming, "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3", "1.2.840.10008.1.2.1")
    subprocess.run(["chattr", "+i", str(incoming)], check=True)
    try:
        stuck.discard()
        assert stuck.path.exists()  # the directory refused the unlink
        assert UNREMOVED.retry() == 1
    finally:
        subprocess.run(["chattr", "-i", str(incoming)], check=True)
    fresh = Spool(incoming, "1.2.840.10008.5.1.4.1.1.1.1", "1.2.4", "1.2.840.10008.1.2.1")
    assert not stuck.path.exists()
    assert [p.name for p in incoming.iterdir()] == [fresh.path.name]
    fresh.discard()
    assert UNREMOVED.retry() == 0


def test_associations_share_the_servers_presentation_contexts_unchanged() -> None:
    """pynetdicom deep-copies the server's supported contexts for every association (~11 ms of CPU
    for ours); GuardedServer hands each association the same context objects instead. Negotiating
    two associations at once (a real requestor over loopback) leaves them exactly as they were."""
    import copy
    import threading

    from pynetdicom import AE, AllStoragePresentationContexts, evt
    from pynetdicom.sop_class import Verification

    from services.ingest.wire.server import GuardedServer

    scp = AE(ae_title="SHARED")
    scp.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        scp.add_supported_context(cx.abstract_syntax)
    server = scp.make_server(("127.0.0.1", 0), server_class=GuardedServer, evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0)])
    scp._servers.append(server)  # as AE.start_server does; shutdown() removes it
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        before = [(cx.abstract_syntax, list(cx.transfer_syntax), cx.scu_role, cx.scp_role) for cx in server.contexts]
        first = server.contexts[0]
        assert copy.deepcopy(server.contexts)[0] is first  # what each new association gets
        scu = AE(ae_title="PROBE")
        scu.add_requested_context(Verification)
        scu.add_requested_context(AllStoragePresentationContexts[0].abstract_syntax)
        port = server.server_address[1]
        assocs = [scu.associate("127.0.0.1", port, ae_title="SHARED") for _ in range(2)]
        try:
            assert all(a.is_established for a in assocs)
            assert all(a.send_c_echo().Status == 0 for a in assocs)
            accepted = [{cx.abstract_syntax for cx in a.accepted_contexts} for a in assocs]
            assert accepted[0] == accepted[1] == {Verification, AllStoragePresentationContexts[0].abstract_syntax}
        finally:
            for a in assocs:
                a.release()
        after = [(cx.abstract_syntax, list(cx.transfer_syntax), cx.scu_role, cx.scp_role) for cx in server.contexts]
        assert server.contexts[0] is first and after == before
    finally:
        server.shutdown()


@pytest.mark.parametrize(
    ("status", "comment", "sop_class", "sop_instance", "message_id"),
    [
        (0x0000, "", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.45", 1),  # even-length UIDs
        (0x0000, "", "1.2.840.10008.5.1.4.1.1.1", "1.2.3.456", 65535),  # odd-length UIDs (padded)
        (0x0122, "unsupported_sop_class", "1.2.840.10008.5.1.4.1.1.2", "1.2.3.4", 7),  # odd comment
        (0xA700, "store_unavailable", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.45", 300),
        (0xA900, "sop_instance_mismatch", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.45", 2),
        (0xC210, "cannot_parse", "1.2.840.10008.5.1.4.1.1.1.1", "1.2.3.45", 3),
    ],
)
def test_c_store_rsp_command_is_pynetdicoms_encoding(
    status: int, comment: str, sop_class: str, sop_instance: str, message_id: int
) -> None:
    """The fast path's response (c_store_rsp_command) is byte for byte what pynetdicom's Storage
    service class sends for the same status dataset (scp.status_dataset)."""
    from pynetdicom.dimse_messages import C_STORE_RSP
    from pynetdicom.dimse_primitives import C_STORE
    from pynetdicom.service_class import StorageServiceClass

    from services.ingest.scp import status_dataset
    from services.ingest.wire.dimse_codec import c_store_rsp_command

    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPClassUID = sop_class
    rsp.AffectedSOPInstanceUID = sop_instance
    rsp = StorageServiceClass(None).validate_status(status_dataset(status, comment), rsp)
    msg = C_STORE_RSP()
    msg.primitive_to_message(rsp)
    pdus = list(msg.encode_msg(1, 1 << 16))
    assert len(pdus) == 1
    ((_, pdv),) = pdus[0].presentation_data_value_list
    assert pdv[0] == 0x03  # command, last fragment
    assert c_store_rsp_command(message_id, sop_class, sop_instance, status, comment) == pdv[1:]
