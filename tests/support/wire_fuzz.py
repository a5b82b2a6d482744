"""Generated DICOM message sequences for the differential wire test (tests/integration/
test_ingest_wire_differential.py): splits, interleavings, wrong contexts, floods, releases, aborts and
garbage, each sequence from one seed, sent on a plain socket to an SCP, with what came back.

`sequence(seed)` builds a list of steps; `play(port, steps)` sends them as one association (waiting
for each complete request's response, as an SCU with one outstanding operation does) and returns a
`Transcript`: the responses (message ID, status, SOP instance) and how the association ended.
`Request.dataset` is the exact data set bytes of each C-STORE request, for the invariant "every
stored file is one request's data set".
"""

from __future__ import annotations

import random
import select
import socket
import struct
import time
from dataclasses import dataclass, field
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import decode
from pynetdicom.sop_class import CTImageStorage, DigitalXRayImageStorageForPresentation, Verification

from tests.support.dicom_raw import associate_rq
from tests.support.dicom_raw import c_echo_command as echo_command
from tests.support.dicom_raw import c_store_command as store_command

DX = DigitalXRayImageStorageForPresentation
ECHO_CX, DX_CX, CT_CX, REJECTED_CX, UNKNOWN_CX = 1, 3, 5, 7, 9
CONTEXTS = [
    (ECHO_CX, Verification, ExplicitVRLittleEndian),
    (DX_CX, DX, ExplicitVRLittleEndian),
    (CT_CX, CTImageStorage, ExplicitVRLittleEndian),
    (REJECTED_CX, "1.2.826.0.1.3680043.9.7433.99.1", ExplicitVRLittleEndian),  # no such SOP class: rejected
]
A_RELEASE_RQ = bytes.fromhex("0500000000040000") + b"\x00\x00"  # type 5, length 4
A_ABORT = bytes.fromhex("070000000004") + b"\x00\x00\x00\x00"


def dx_dataset(patient: str | None, sop_instance: str, rng: random.Random, rows: int = 64) -> bytes:
    """A small, valid frontal chest DX data set (explicit VR little endian) naming `patient` (None: no
    patient elements at all, as in the spliced-file report, where the first request's name showed)."""
    ds = Dataset()
    ds.SOPClassUID = DX
    ds.SOPInstanceUID = sop_instance
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    if patient is not None:
        ds.PatientName = patient
        ds.PatientID = patient.upper()
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "PA"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = rows
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = rng.randbytes(rows * rows * 2)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


LONG_VRS = (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")


def element_ends(data: bytes) -> list[int]:
    """Offsets where each top-level element of an explicit VR little endian data set ends."""
    ends, pos = [], 0
    while pos + 8 <= len(data):
        vr = data[pos + 4 : pos + 6]
        if vr in LONG_VRS:
            (length,) = struct.unpack_from("<L", data, pos + 8)
            pos += 12 + length
        else:
            (length,) = struct.unpack_from("<H", data, pos + 6)
            pos += 8 + length
        ends.append(pos)
    return ends


@dataclass
class Request:
    message_id: int
    sop_instance: str
    dataset: bytes  # b"" for a C-ECHO


@dataclass
class Step:
    pdus: list[bytes]  # sent together
    expect_response: bool = False  # a complete request: wait for its answer
    ends: bool = False  # breaks the protocol or ends the association: read until the SCP ends it
    what: str = ""


@dataclass
class Transcript:
    responses: list[tuple[int, int, str]] = field(default_factory=list)  # (message ID, status, SOP instance)
    end: str = ""  # released, aborted, closed, open

    def __str__(self) -> str:
        return f"responses={self.responses} end={self.end}"


def pdu_of(pdvs: list[tuple[int, int, bytes]]) -> bytes:
    items = b"".join(struct.pack(">LBB", len(f) + 2, cx, ctl) + f for cx, ctl, f in pdvs)
    return struct.pack(">BBL", 0x04, 0, len(items)) + items


def _pack(rng: random.Random, pdvs: list[tuple[int, int, bytes]]) -> list[bytes]:
    """PDVs packed into P-DATA-TF PDUs of 1-3 PDVs each (so one PDU may end one message and begin
    the next only where a test step says so)."""
    pdus = []
    i = 0
    while i < len(pdvs):
        n = rng.randint(1, 3)
        pdus.append(pdu_of(pdvs[i : i + n]))
        i += n
    return pdus


def _split(rng: random.Random, data: bytes, parts: int) -> list[bytes]:
    if parts <= 1 or len(data) < parts:
        return [data]
    cuts = sorted(rng.sample(range(1, len(data)), parts - 1))
    return [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def _command_pdvs(rng: random.Random, cx: int, command: bytes) -> list[tuple[int, int, bytes]]:
    pieces = _split(rng, command, rng.choice([1, 1, 1, 2, 3]))
    return [(cx, 0x01 | (0x02 if i == len(pieces) - 1 else 0), p) for i, p in enumerate(pieces)]


def _data_pdvs(rng: random.Random, cx: int, data: bytes, last: bool = True) -> list[tuple[int, int, bytes]]:
    pieces = _split(rng, data, rng.choice([1, 1, 2, 3, 5, 8]))
    return [(cx, 0x02 if (last and i == len(pieces) - 1) else 0x00, p) for i, p in enumerate(pieces)]


class Generator:
    """Sequences of steps from one seed; UIDs are drawn from the seed too, so a failing seed replays."""

    def __init__(self, seed: int, history: list[Request] | None = None) -> None:
        self.rng = random.Random(seed)
        self.seed = seed
        self.next_id = 1
        self.requests: list[Request] = []
        self.history = history if history is not None else []  # C-STOREs of earlier sequences (re-sends)

    def _uid(self) -> str:
        return f"1.2.826.0.1.3680043.9.7433.2.{self.seed}.{self.rng.getrandbits(40)}"

    def sequence(self) -> list[Step]:
        rng = self.rng
        steps: list[Step] = []
        for _ in range(rng.randint(1, 4)):
            kind = rng.choices(
                [
                    "store",
                    "echo",
                    "ct_context",
                    "spliced",
                    "orphan_data",
                    "wrong_context",
                    "unaccepted_context",
                    "empty_pdvs",
                    "garbage_command",
                    "unknown_command",
                    "partial_then_release",
                ],
                weights=[40, 8, 4, 8, 4, 4, 3, 4, 3, 2, 4],
            )[0]
            steps.extend(getattr(self, f"_{kind}")())
            if steps[-1].ends:
                return steps
        end = rng.choice(["release", "release", "abort", "close"])
        if end == "release":
            steps.append(Step([A_RELEASE_RQ], ends=True, what="release"))
        elif end == "abort":
            steps.append(Step([A_ABORT], ends=True, what="abort"))
        else:
            steps.append(Step([], ends=True, what="close"))
        return steps

    # --- the kinds of step --------------------------------------------------------------------------
    def _store(self) -> list[Step]:
        request, _, pdvs = self._new_request(DX_CX, DX)
        pdvs += _data_pdvs(self.rng, DX_CX, request.dataset)
        return [Step(_pack(self.rng, pdvs), expect_response=True, what="store")]

    def _echo(self) -> list[Step]:
        command = echo_command(self.next_id)
        self.requests.append(Request(self.next_id, "", b""))
        self.next_id += 1
        return [Step(_pack(self.rng, _command_pdvs(self.rng, ECHO_CX, command)), expect_response=True, what="echo")]

    def _ct_context(self) -> list[Step]:
        """A DX C-STORE on the presentation context accepted for CT."""
        request, _, pdvs = self._new_request(CT_CX, DX)
        pdvs += _data_pdvs(self.rng, CT_CX, request.dataset)
        return [Step(_pack(self.rng, pdvs), expect_response=True, what="dx on the ct context")]

    def _spliced(self) -> list[Step]:
        """A C-STORE's command and part of its data set, then a whole second C-STORE (issue 22 #1)."""
        first, _, pdvs = self._new_request(DX_CX, DX)
        ends = element_ends(first.dataset)
        # mostly at an element boundary (what parses, so what a splice would store), else anywhere
        cut = self.rng.choice(ends[:-1]) if self.rng.random() < 0.7 else self.rng.randint(1, len(first.dataset) - 1)
        pdvs += _data_pdvs(self.rng, DX_CX, first.dataset[:cut], last=False)
        second, _, pdvs2 = self._new_request(DX_CX, DX, anonymous=self.rng.random() < 0.5)
        pdvs2 += _data_pdvs(self.rng, DX_CX, second.dataset)
        return [Step(_pack(self.rng, pdvs) + _pack(self.rng, pdvs2), ends=True, what="spliced")]

    def _orphan_data(self) -> list[Step]:
        data = dx_dataset("Orphan^Data", self._uid(), self.rng)
        return [Step(_pack(self.rng, _data_pdvs(self.rng, DX_CX, data)), ends=True, what="data before a command")]

    def _wrong_context(self) -> list[Step]:
        request, _, pdvs = self._new_request(DX_CX, DX)
        pieces = _data_pdvs(self.rng, DX_CX, request.dataset)
        k = self.rng.randrange(len(pieces))
        pieces[k] = (self.rng.choice([ECHO_CX, CT_CX]), pieces[k][1], pieces[k][2])
        return [Step(_pack(self.rng, pdvs + pieces), ends=True, what="a fragment on another context")]

    def _unaccepted_context(self) -> list[Step]:
        request, command, _ = self._new_request(DX_CX, DX)
        cx = self.rng.choice([REJECTED_CX, UNKNOWN_CX])
        pdvs = [(cx, 0x03, command), *_data_pdvs(self.rng, cx, request.dataset)]
        return [Step(_pack(self.rng, pdvs), ends=True, what="a context that was not accepted")]

    def _empty_pdvs(self) -> list[Step]:
        request, _, pdvs = self._new_request(DX_CX, DX)
        empties = [(DX_CX, 0x00, b"")] * self.rng.choice([3, 20, 400])
        pdvs += empties + _data_pdvs(self.rng, DX_CX, request.dataset)
        flood = len(empties) > 100
        return [Step(_pack(self.rng, pdvs), expect_response=not flood, ends=flood, what=f"{len(empties)} empty PDVs")]

    def _garbage_command(self) -> list[Step]:
        junk = self.rng.randbytes(self.rng.randint(1, 40))
        return [Step([pdu_of([(DX_CX, 0x03, junk)])], ends=True, what="a command that does not decode")]

    def _unknown_command(self) -> list[Step]:
        command = bytearray(echo_command(self.next_id))
        # CommandField (0000,0100) of the C-ECHO-RQ: 0x0030 -> 0x0099 (no such DIMSE command)
        at = command.find(struct.pack("<HHL", 0, 0x0100, 2))
        command[at + 8 : at + 10] = struct.pack("<H", 0x0099)
        return [Step([pdu_of([(ECHO_CX, 0x03, bytes(command))])], ends=True, what="an unknown command field")]

    def _partial_then_release(self) -> list[Step]:
        request, _, pdvs = self._new_request(DX_CX, DX)
        pdvs += _data_pdvs(self.rng, DX_CX, request.dataset[: len(request.dataset) // 2], last=False)
        return [Step([*_pack(self.rng, pdvs), A_RELEASE_RQ], ends=True, what="half a data set, then release")]

    def _new_request(
        self, cx: int, sop_class: str, anonymous: bool = False
    ) -> tuple[Request, bytes, list[tuple[int, int, bytes]]]:
        rng = self.rng
        roll = rng.random()
        if self.history and roll < 0.08:  # the same instance again, same bytes (a retry)
            earlier = rng.choice(self.history)
            uid, data = earlier.sop_instance, earlier.dataset
        elif self.history and roll < 0.14:  # the same UID, other content
            uid = rng.choice(self.history).sop_instance
            data = dx_dataset(f"Other^{rng.getrandbits(16)}", uid, rng)
        else:
            uid = self._uid()
            name = None if anonymous else f"Patient^{rng.getrandbits(24)}"
            data = dx_dataset(name, uid, rng, rows=rng.choice([64, 64, 96]))
        request = Request(self.next_id, uid, data)
        self.next_id += 1
        self.requests.append(request)
        command = store_command(sop_class, uid, request.message_id)
        return request, command, _command_pdvs(rng, cx, command)


# --- playing a sequence --------------------------------------------------------------------------
class NotAccepted(ConnectionError):
    """The SCP did not accept the association (nothing of the sequence was sent yet)."""


class _Peer:
    def __init__(self, port: int, called: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.sock.sendall(associate_rq(called, "FUZZSCU", CONTEXTS))
        pdu = self.read_pdu(10)
        if not pdu or pdu[0] != 0x02:
            self.sock.close()
            raise NotAccepted(f"association not accepted: {pdu[:1] if pdu else pdu!r}")

    def read_pdu(self, timeout: float) -> bytes | None:
        """One whole PDU, b"" when the SCP closed the connection, None on timeout."""
        deadline = time.monotonic() + timeout
        while True:
            if len(self.buf) >= 6:
                (length,) = struct.unpack_from(">L", self.buf, 2)
                if len(self.buf) >= 6 + length:
                    pdu, self.buf = self.buf[: 6 + length], self.buf[6 + length :]
                    return pdu
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            ready, _, _ = select.select([self.sock], [], [], remaining)
            if not ready:
                return None
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return b""
            if not chunk:
                return b""
            self.buf += chunk


def _response(pdu: bytes) -> tuple[int, int, str] | None:
    """(message ID being responded to, status, affected SOP instance) of a one-PDU response."""
    (item_len,) = struct.unpack_from(">L", pdu, 6)
    if not pdu[11] & 1:
        return None
    cs = decode(BytesIO(pdu[12 : 10 + item_len]), True, True)
    return int(cs.MessageIDBeingRespondedTo), int(cs.Status), str(cs.get("AffectedSOPInstanceUID", ""))


def play(port: int, called: str, steps: list[Step], timeout: float = 10.0, tries: int = 3) -> Transcript:
    """Send the steps as one association; what came back. An association the SCP did not accept
    (on a machine loaded past its request timeout) is tried again: nothing of the sequence was sent."""
    for attempt in range(tries):
        try:
            peer = _Peer(port, called)
            break
        except NotAccepted:
            if attempt == tries - 1:
                raise
            time.sleep(1.0)  # a back-off before the next try, not synchronisation
    out = Transcript()
    try:
        for step in steps:
            try:
                if step.what == "close":
                    peer.sock.shutdown(socket.SHUT_WR)
                else:
                    peer.sock.sendall(b"".join(step.pdus))
            except OSError:
                out.end = "closed"
                return out
            if not (step.expect_response or step.ends):
                continue
            while True:
                pdu = peer.read_pdu(timeout)
                if pdu is None:
                    out.end = "open"  # nothing came back in time
                    return out
                if pdu == b"":
                    out.end = "closed"
                    return out
                if pdu[0] == 0x04:
                    response = _response(pdu)
                    if response is not None:
                        out.responses.append(response)
                    if step.expect_response and not step.ends:
                        break
                    continue
                out.end = {0x06: "released", 0x07: "aborted"}.get(pdu[0], f"pdu {pdu[0]:#04x}")
                return out
        out.end = "open"
        return out
    finally:
        peer.sock.close()
