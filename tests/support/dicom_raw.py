"""A hand-rolled DICOM association requestor for hostile-peer tests: it sends exactly the bytes a test
asks for (a PDU declaring 1 GiB, a data set whose Pixel Data declares 1 GiB, nothing at all), which
no conforming toolkit will do. Blocking; call it from a thread when the SCP runs in the test's loop.
"""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import Callable
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, Verification

APPLICATION_CONTEXT = b"1.2.840.10008.3.1.1.1"
IMPLEMENTATION_UID = b"1.2.826.0.1.3680043.9.7433.1"


def _item(item_type: int, payload: bytes) -> bytes:
    return struct.pack(">BBH", item_type, 0, len(payload)) + payload


def associate_rq(called: str, calling: str, contexts: list[tuple[int, str, str]], max_pdu: int = 65536) -> bytes:
    body = struct.pack(">HH", 1, 0) + called.ljust(16).encode() + calling.ljust(16).encode() + b"\x00" * 32
    body += _item(0x10, APPLICATION_CONTEXT)
    for context_id, abstract, transfer in contexts:
        sub = _item(0x30, abstract.encode()) + _item(0x40, transfer.encode())
        body += _item(0x20, struct.pack(">BBBB", context_id, 0, 0, 0) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">L", max_pdu)) + _item(0x52, IMPLEMENTATION_UID))
    return struct.pack(">BBL", 0x01, 0, len(body)) + body


def p_data(context_id: int, control: int, fragment: bytes) -> bytes:
    item = struct.pack(">LBB", len(fragment) + 2, context_id, control) + fragment
    return struct.pack(">BBL", 0x04, 0, len(item)) + item


def command_bytes(msg: C_STORE_RQ | C_ECHO_RQ, primitive: C_STORE | C_ECHO) -> bytes:
    """The encoded command set of a DIMSE request (what its command fragments carry)."""
    msg.primitive_to_message(primitive)
    out = b""
    for p in msg.encode_msg(1, 1 << 20):
        for _, pdv in p.presentation_data_value_list:
            if pdv[0] & 1:
                out += pdv[1:]
    return out


def c_store_command(sop_class: str, sop_instance: str, message_id: int = 1) -> bytes:
    """The encoded command set of a C-STORE-RQ that announces a data set."""
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 0
    req.DataSet = BytesIO(b"\x00")
    return command_bytes(C_STORE_RQ(), req)


def c_echo_command(message_id: int = 1) -> bytes:
    """The encoded command set of a C-ECHO-RQ."""
    req = C_ECHO()
    req.MessageID = message_id
    req.AffectedSOPClassUID = Verification
    return command_bytes(C_ECHO_RQ(), req)


def dx_header(declared_pixel_bytes: int, rows: int = 512, columns: int = 512) -> tuple[str, bytes]:
    """(SOP instance UID, explicit VR little endian data set up to and including the Pixel Data header)."""
    ds = Dataset()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    pixel_header = struct.pack("<HH", 0x7FE0, 0x0010) + b"OW\x00\x00" + struct.pack("<L", declared_pixel_bytes)
    return str(ds.SOPInstanceUID), buf.getvalue() + pixel_header


class RawAssociation:
    """One association on a plain socket; `stream` reports whether the SCP aborted it, and when."""

    def __init__(self, port: int, called: str, calling: str = "RAWSCU", host: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection((host, port), timeout=10)
        contexts = [
            (1, Verification, ExplicitVRLittleEndian),
            (3, DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian),
        ]
        self.sock.sendall(associate_rq(called, calling, contexts))
        header = self._recv_exact(6)
        pdu_type, _, length = struct.unpack(">BBL", header)
        self._recv_exact(length)
        if pdu_type != 0x02:
            raise ConnectionError(f"association not accepted (PDU type {pdu_type:#04x})")

    def _recv_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed by the SCP")
            data += chunk
        return data

    def ended_by_peer(self) -> bool:
        """True when the SCP sent A-ABORT or closed the connection (does not block)."""
        readable, _, _ = select.select([self.sock], [], [], 0)
        if not readable:
            return False
        try:
            first = self.sock.recv(1)
        except OSError:
            return True
        return first in (b"", b"\x07")

    def stream(
        self, head: bytes, total: int, chunk: int = 1 << 20, wrap: Callable[[bytes], bytes] | None = None
    ) -> int | None:
        """Send `head`, then zeros up to `total` bytes (each chunk passed through `wrap`, e.g. into a
        P-DATA PDU); the bytes sent when the SCP ended the association, or None when it took them all."""
        sent = 0
        zeros = bytes(chunk)
        try:
            self.sock.sendall(head)
            sent = len(head)
            while sent < total:
                if self.ended_by_peer():
                    return sent
                piece = zeros[: min(chunk, total - sent)]
                self.sock.sendall(wrap(piece) if wrap else piece)
                sent += len(piece)
        except (BrokenPipeError, ConnectionResetError):
            return sent
        return sent if self.ended_by_peer() else None

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> RawAssociation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
