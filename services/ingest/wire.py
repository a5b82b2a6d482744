"""What the DICOM port does before a C-STORE handler runs: connection policy, PDU limits, streaming.

pynetdicom reads every PDU whole into memory, whatever length its header declares, and collects a
C-STORE data set in memory until its last fragment, and its two threads per association poll every
millisecond. The pieces here:

- `GuardedServer`: pynetdicom's threaded association server that sets TCP_NODELAY on every accepted
  socket and bounds the connections that have not sent their A-ASSOCIATE-RQ yet: when a new one
  arrives and `max_pending` are waiting, the oldest waiting one is closed. With the short request
  timeout (scp.py) idle sockets cannot hold the association slots a modality needs.
- `Wire`: replaces one association's DUL PDU reader. A P-DATA-TF PDU longer than the negotiated
  maximum (PT_INGEST_MAX_PDU_BYTES), or any other PDU over 1 MiB, aborts the association before its
  body is read. The data set of each C-STORE request is written to a spool file beside the image
  store as its fragments arrive (hashed on the way, File Meta Information in front), and stripped
  from what pynetdicom sees, so memory does not grow with the instance. An instance whose Pixel Data
  element declares more than the per-instance byte limit, or whose bytes pass it, is aborted at once
  (A-ABORT), with a reason in the log and in `pt_ingest_rejected_total`. A C-STORE request that
  fits (see Wire) is taken past pynetdicom's DIMSE layer and handled on this thread: ~1.3-1.9 ms of
  CPU less per instance (docs/performance.md).
- `Waker` / `install_reactor_wakeups`: the two reactor threads of our associations wait for work
  (queue puts, socket data) instead of polling every millisecond.

The C-STORE handler takes the completed spool file (`Wire.take`) and either moves it into the store
(ContentStore.put_spool) or discards it.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import hashlib
import logging
import os
import queue
import select
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dul import DULServiceProvider
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
MAX_OTHER_PDU = 1 << 20  # A-ASSOCIATE-RQ with ~130 presentation contexts is ~30 KiB
MAX_COMMAND_BYTES = 1 << 16
MAX_NON_STORE_DATASET = 1 << 20  # a data set of any other DIMSE request (we support none with one)
C_STORE_RQ = 0x0001
NO_DATASET = 0x0101
SCAN_LIMIT = 1 << 20  # the Pixel Data header is looked for in this many first bytes of a data set
PIXEL_DATA_TAG = (0x7FE0, 0x0010)
UNDEFINED = 0xFFFFFFFF
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
SPOOL_DIR = ".incoming"
STALE_SPOOL_S = 3600.0


class _Unscannable(Exception):
    """The data set does not parse as its transfer syntax says (pydicom may still read it): stop looking."""


class WireRefusal(Exception):
    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


# --- spool files ---------------------------------------------------------------------------------
def _element(group: int, elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b" " if vr == b"SH" else b"\x00"
    if vr == b"OB":
        return struct.pack("<HH2sHL", group, elem, vr, 0, len(value)) + value
    return struct.pack("<HH2sH", group, elem, vr, len(value)) + value


def part10_header(sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information (explicit VR little endian), encoded directly:
    the same bytes pydicom writes for pynetdicom's create_file_meta, ~100x cheaper per instance."""
    body = b"".join(
        (
            _element(0x0002, 0x0001, b"OB", b"\x00\x01"),
            _element(0x0002, 0x0002, b"UI", sop_class_uid.encode("ascii")),
            _element(0x0002, 0x0003, b"UI", sop_instance_uid.encode("ascii")),
            _element(0x0002, 0x0010, b"UI", transfer_syntax.encode("ascii")),
            _element(0x0002, 0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode("ascii")),
            _element(0x0002, 0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")),
        )
    )
    return b"\x00" * 128 + b"DICM" + _element(0x0002, 0x0000, b"UL", struct.pack("<L", len(body))) + body


class _Unremoved:
    """Spool files that could not be removed when dropped (e.g. the store made immutable for a while):
    retried whenever a new spool file is created, so a passing fault leaves no file behind."""

    def __init__(self) -> None:
        self._paths: set[Path] = set()
        self._lock = threading.Lock()

    def remove(self, path: Path) -> None:
        """Remove a spool file now, or remember it for a later retry when that fails."""
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove a spool file yet: retried later", extra={"error": repr(exc)[:300]})
            with self._lock:
                self._paths.add(path)

    def retry(self) -> int:
        """Remove what can be removed now; returns how many are still left."""
        if not self._paths:  # the common case: no lock taken
            return 0
        with self._lock:
            for path in list(self._paths):
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass
                except OSError:
                    continue
                self._paths.discard(path)
            return len(self._paths)


UNREMOVED = _Unremoved()


class Spool:
    """One C-STORE data set received into a file (preamble + File Meta + data set), hashed as written.

    When the file cannot be written (disk full, store gone), the spool drops what it has and only
    counts what still arrives: the handler then answers 0xA700 with `error` as the reason."""

    def __init__(self, directory: Path, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str) -> None:
        self.sop_class_uid, self.sop_instance_uid = sop_class_uid, sop_instance_uid
        self.transfer_syntax = transfer_syntax
        self.path = directory / f"{uuid.uuid4().hex}.part"
        self.sha = hashlib.sha256()
        self.size = 0
        self.complete = False
        self.error: str | None = None
        self.fd: int | None = None
        UNREMOVED.retry()
        # the DUL thread writes while the association may end on another thread: the fd is only
        # used and closed under this lock, so a closed (and reused) fd number is never written to
        self._fd_lock = threading.RLock()
        try:
            try:
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:  # the store was re-created under us: so is the spool directory
                directory.mkdir(parents=True, exist_ok=True)
                self.fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except OSError as exc:
            self._fail(exc)
            return
        self.write(part10_header(sop_class_uid, sop_instance_uid, transfer_syntax))

    def _fail(self, exc: OSError) -> None:
        self.error = f"cannot write the incoming data set: {exc.strerror or exc}"
        log.error("cannot spool an incoming data set", extra={"error": repr(exc)[:300]})
        self.discard()

    def write(self, data: bytes | memoryview) -> None:
        self.size += len(data)
        with self._fd_lock:
            if self.error is not None or self.fd is None:
                return
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(self.fd, view) :]
            except OSError as exc:
                self._fail(exc)
                return
        self.sha.update(data)

    @property
    def sha256(self) -> str:
        return self.sha.hexdigest()

    def sync_and_close(self) -> None:
        with self._fd_lock:
            if self.fd is None:
                raise OSError(errno.EBADF, self.error or "the spool file was discarded")
            try:
                # on the association's thread: a background fsync (tried) overlapped the disk with
                # validation but cost ~1-2 ms of CPU per image in thread hand-overs (docs/performance.md)
                os.fsync(self.fd)
            finally:
                fd, self.fd = self.fd, None
                os.close(fd)

    def discard(self) -> None:
        with self._fd_lock:
            if self.fd is not None:
                fd, self.fd = self.fd, None
                with contextlib.suppress(OSError):
                    os.close(fd)
        UNREMOVED.remove(self.path)


def spool_dir(store_root: Path) -> Path:
    return store_root / SPOOL_DIR


def clean_spool(directory: Path, older_than_s: float = STALE_SPOOL_S) -> int:
    """Remove spool files left by a process that died mid-transfer (fresh ones may be another process's)."""
    removed = 0
    cutoff = time.time() - older_than_s
    for path in directory.glob("*.part"):
        with contextlib.suppress(OSError):
            if path.stat().st_mtime < cutoff:
                path.unlink()
                removed += 1
    return removed


# --- the Pixel Data length, read from the first bytes of a data set ------------------------------
def _skip_undefined(buf: bytes, pos: int, implicit: bool, depth: int) -> int | None:
    """End offset of an undefined-length sequence value starting at pos; None if buf ends first."""
    if depth > 16:
        raise _Unscannable("sequences nested too deeply")
    while True:
        if pos + 8 > len(buf):
            return None
        group, elem, length = struct.unpack_from("<HHL", buf, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):  # sequence delimitation
            return pos
        if (group, elem) != (0xFFFE, 0xE000):
            raise _Unscannable("malformed sequence item")
        if length != UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: its elements up to the item delimitation
            if pos + 8 > len(buf):
                return None
            group, elem = struct.unpack_from("<HH", buf, pos)
            if (group, elem) == (0xFFFE, 0xE00D):
                pos += 8
                break
            step = _element_end(buf, pos, implicit, depth + 1)
            if step is None:
                return None
            pos = step[0]


def _element_end(buf: bytes, pos: int, implicit: bool, depth: int) -> tuple[int, tuple[int, int], int] | None:
    """(end offset, tag, declared length) of the element at pos; None if buf ends first."""
    if pos + 8 > len(buf):
        return None
    group, elem = struct.unpack_from("<HH", buf, pos)
    if implicit or group == 0xFFFE:
        (length,) = struct.unpack_from("<L", buf, pos + 4)
        start, is_sq = pos + 8, length == UNDEFINED
    else:
        vr = bytes(buf[pos + 4 : pos + 6])
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise _Unscannable("not explicit VR")  # e.g. implicit VR under an explicit VR syntax
        if vr in LONG_VRS:
            if pos + 12 > len(buf):
                return None
            (length,) = struct.unpack_from("<L", buf, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            start = pos + 8
        is_sq = length == UNDEFINED
    if (group, elem) == PIXEL_DATA_TAG:
        return start, (group, elem), length  # its value is not needed: the header says enough
    if is_sq:
        end = _skip_undefined(buf, start, implicit, depth)
        return None if end is None else (end, (group, elem), length)
    return start + length, (group, elem), length


class PixelLengthScan:
    """Finds the Pixel Data element's declared length in the first bytes of a data set, incrementally."""

    def __init__(self, transfer_syntax: str) -> None:
        self.implicit = transfer_syntax == ImplicitVRLittleEndian
        self.active = transfer_syntax != DeflatedExplicitVRLittleEndian and not UID(transfer_syntax).is_deflated
        self.buf = bytearray()
        self.pos = 0

    def feed(self, data: bytes | memoryview) -> int | None:
        """The declared Pixel Data length once seen (UNDEFINED for encapsulated data), else None."""
        if not self.active:
            return None
        self.buf += data
        while True:
            try:
                step = _element_end(self.buf, self.pos, self.implicit, 0)
            except _Unscannable:
                self.active, self.buf = False, bytearray()  # the byte cap still applies
                return None
            if step is None:
                if len(self.buf) >= SCAN_LIMIT:
                    self.active, self.buf = False, bytearray()  # not in the first MiB: the byte cap rules
                return None
            end, tag, length = step
            if tag == PIXEL_DATA_TAG:
                self.active, self.buf = False, bytearray()
                return length
            if tag[0] > PIXEL_DATA_TAG[0]:
                self.active, self.buf = False, bytearray()
                return None
            self.pos = end


def command_fields(raw: bytes) -> dict[int, int | str] | None:
    """The few command elements we need, from an encoded command set (group 0000, implicit VR
    little endian): CommandField (0100), MessageID (0110), CommandDataSetType (0800) as numbers,
    Affected SOP Class (0002) and Instance (1000) UIDs as text. None when the bytes are not a
    command set."""
    out: dict[int, int | str] = {}
    pos = 0
    while pos + 8 <= len(raw):
        group, elem, length = struct.unpack_from("<HHL", raw, pos)
        pos += 8
        if group != 0x0000 or pos + length > len(raw):
            return None
        value = raw[pos : pos + length]
        pos += length
        if elem in (0x0100, 0x0110, 0x0800) and length == 2:
            out[elem] = struct.unpack("<H", value)[0]
        elif elem in (0x0002, 0x1000):
            out[elem] = value.rstrip(b"\x00 ").decode("ascii", "replace")
    return out if pos == len(raw) else None


def _command_element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, elem, len(value)) + value


def c_store_rsp_command(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int, error_comment: str = ""
) -> bytes:
    """The command set of a C-STORE-RSP (group 0000, implicit VR little endian), encoded directly:
    the same bytes as pynetdicom's C_STORE_RSP encoder (tests/unit/test_ingest_wire.py), ~20x
    cheaper than building it through a pydicom dataset."""

    def uid(value: str) -> bytes:
        raw = value.encode("ascii")
        return raw + b"\x00" if len(raw) % 2 else raw

    body = b"".join(
        (
            _command_element(0x0002, uid(sop_class_uid)),
            _command_element(0x0100, struct.pack("<H", 0x8001)),
            _command_element(0x0120, struct.pack("<H", message_id)),
            _command_element(0x0800, struct.pack("<H", NO_DATASET)),
            _command_element(0x0900, struct.pack("<H", status)),
        )
    )
    if error_comment:
        comment = error_comment.encode("ascii", "replace")[:64]
        body += _command_element(0x0902, comment + b" " if len(comment) % 2 else comment)
    body += _command_element(0x1000, uid(sop_instance_uid))
    return _command_element(0x0000, struct.pack("<L", len(body))) + body


# --- the per-association PDU reader ------------------------------------------------------------
@dataclass
class StoreRequest:
    """A whole C-STORE request taken past pynetdicom's DIMSE layer (see Wire)."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    spool: Spool


class Wire:
    """Replaces `assoc.dul._read_pdu_data` for one association (see the module docstring).

    With `on_store`, a C-STORE request whose command set arrives whole in one fragment, on an
    accepted presentation context of its SOP class while the association is established, is taken
    past pynetdicom's DIMSE layer: neither its command nor its data set reaches pynetdicom, and
    once the data set is complete `on_store` runs on this (the DUL) thread and answers with
    `send_command` (this thread sends every PDU of the association, so nothing interleaves). That
    skips, per instance, pynetdicom's decoding of the message, its hand-over to the association's
    thread and back, its service-class dispatch and its encoding of the response. Anything else
    (C-ECHO, a command in several fragments) goes through pynetdicom as before."""

    def __init__(
        self,
        assoc: Any,
        spool_directory: Path,
        max_pdu: int,
        max_instance_bytes: int,
        on_refused: Callable[[str], None],
        on_store: Callable[[Wire, StoreRequest], None] | None = None,
    ) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self.spool_directory = spool_directory
        self.max_pdu = max_pdu
        self.max_instance_bytes = max_instance_bytes
        self.on_refused = on_refused
        self.on_store = on_store
        self.aborted = False
        self._command = bytearray()
        self._store: tuple[int, str, str] | None = None  # (context id, SOP class, SOP instance)
        self._taken: int | None = None  # message ID of the C-STORE in _store when taken past pynetdicom
        self._ready: list[StoreRequest] = []
        self._other_bytes = 0
        self._spool: Spool | None = None
        self._scan: PixelLengthScan | None = None
        self._done: collections.deque[Spool] = collections.deque()
        self._lock = threading.Lock()

    @classmethod
    def install(cls, assoc: Any, **kwargs: Any) -> Wire:
        wire = cls(assoc, **kwargs)
        assoc.dul._read_pdu_data = wire.read_pdu
        assoc._pt_wire = wire
        return wire

    @staticmethod
    def of(assoc: Any) -> Wire | None:
        return getattr(assoc, "_pt_wire", None)

    # --- the handler's side ----------------------------------------------------------------
    def take(self, sop_instance_uid: str) -> Spool | None:
        """The completed data set of the C-STORE being handled (None if it was not spooled)."""
        with self._lock:
            while self._done:
                spool = self._done.popleft()
                if spool.sop_instance_uid == sop_instance_uid:
                    return spool
                spool.discard()
        return None

    def close(self) -> None:
        """Discard whatever is still spooled (association over)."""
        with self._lock:
            spools = [*self._done, *([self._spool] if self._spool else []), *(r.spool for r in self._ready)]
            self._done.clear()
            self._ready = []
            self._spool = None
        for spool in spools:
            spool.discard()

    def send_command(self, context_id: int, command: bytes) -> bool:
        """Send a whole command set (no data set) in one P-DATA-TF PDU, on the DUL thread only (the
        thread that sends every PDU of the association, so nothing interleaves). False, and nothing
        sent, when the peer's maximum PDU length is too small for it (the caller then goes through
        pynetdicom's DIMSE provider, which fragments)."""
        peer_max = self.assoc.dimse.maximum_pdu_size or 0  # the peer's (A-ASSOCIATE-RQ), 0: unlimited
        item = struct.pack(">LBB", len(command) + 2, context_id, 0x03) + command  # command, last fragment
        if peer_max and len(item) > peer_max:
            return False
        self.dul.socket.send(struct.pack(">BBL", P_DATA_TF, 0, len(item)) + item)  # on error: Evt17 queued
        return True

    # --- the DUL's side --------------------------------------------------------------------
    def _recv(self, n: int) -> bytearray:
        sock: socket.socket = self.dul.socket.socket
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = sock.recv_into(view[got:], n - got)
            if k == 0:
                return buf[:got]
            got += k
        return buf

    def read_pdu(self) -> None:
        """pynetdicom's `_read_pdu_data` with limits and streaming (same events on the same queue)."""
        dul = self.dul
        if self.aborted:  # Sta13 after our A-ABORT: do not read what the peer still sends
            dul.socket.close()
            return
        try:
            header = self._recv(6)
        except (OSError, TimeoutError):
            dul.event_queue.put("Evt17")
            return
        if len(header) < 6:
            dul.event_queue.put("Evt17")
            return
        pdu_type, _, length = struct.unpack(">BBL", header)
        if pdu_type not in (0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0x07):
            dul.event_queue.put("Evt19")
            return
        limit = self.max_pdu if pdu_type == P_DATA_TF else MAX_OTHER_PDU
        if length > limit:
            self._abort("pdu_too_large", f"PDU type {pdu_type:#04x} declares {length} bytes, limit {limit}")
            return
        try:
            body = self._recv(length)
        except (OSError, TimeoutError):
            dul.event_queue.put("Evt17")
            return
        if len(body) != length:
            dul.event_queue.put("Evt17")
            return
        if pdu_type == P_DATA_TF:
            try:
                body = self._p_data(body)
            except WireRefusal as exc:
                self._abort(exc.code, exc.reason)
                return
            except Exception as exc:  # never let the DUL thread die on what a peer sent
                log.exception("cannot handle a P-DATA PDU")
                self._abort("internal_error", f"{type(exc).__name__}")
                return
            ready, self._ready = self._ready, []
            for request in ready:
                assert self.on_store is not None
                self.on_store(self, request)  # never raises (scp.py answers every request)
            if not body:  # every fragment was taken: nothing for pynetdicom
                return
            header[2:6] = struct.pack(">L", len(body))
        try:
            pdu, event = dul._decode_pdu(header + body)
        except Exception:
            log.warning("undecodable PDU received", extra={"pdu_type": pdu_type})
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    def _abort(self, code: str, reason: str) -> None:
        self.aborted = True
        self.close()
        peer = self.assoc.requestor.address_info
        log.warning(
            "DICOM association aborted",
            extra={
                "reason_code": code,
                "reason": reason,
                "peer": str(getattr(peer, "address", "")),
                "calling_ae": str(self.assoc.requestor.ae_title or "").strip(),
            },
        )
        self.on_refused(code)
        self.dul.event_queue.put("Evt19")  # invalid PDU: the state machine sends A-ABORT and closes

    def _p_data(self, body: bytearray) -> bytearray:
        """Handle the PDVs of one P-DATA-TF; returns the body with spooled data-set fragments emptied."""
        out: bytearray | None = None
        pos, end = 0, len(body)
        view = memoryview(body)
        while pos < end:
            if pos + 6 > end:
                return body  # malformed: pynetdicom's decoder rejects it
            (item_len,) = struct.unpack_from(">L", body, pos)
            if item_len < 2 or pos + 4 + item_len > end:
                return body
            context_id, control = body[pos + 4], body[pos + 5]
            fragment = view[pos + 6 : pos + 4 + item_len]
            spooled = taken = False
            if control & 1:
                if self._taken is not None:
                    raise WireRefusal("cannot_parse", "a command before the data set of the C-STORE request")
                whole = not self._command and bool(control & 2)
                self._command += fragment
                if len(self._command) > MAX_COMMAND_BYTES:
                    raise WireRefusal("cannot_parse", "command set too long")
                if control & 2:
                    taken = self._command_complete(context_id, whole)
            elif self._store is not None and self._store[0] == context_id:
                taken = self._taken is not None
                self._dataset(fragment, last=bool(control & 2))
                spooled = not taken
            elif self._taken is not None:
                raise WireRefusal("cannot_parse", "a data set on another presentation context than its C-STORE's")
            else:
                self._other_bytes += len(fragment)
                if self._other_bytes > MAX_NON_STORE_DATASET:
                    raise WireRefusal("dataset_too_large", "data set of a non-storage request too long")
                if control & 2:
                    self._other_bytes = 0
            if (spooled or taken) and out is None:
                out = bytearray(body[:pos])
            if out is not None:
                if spooled:
                    out += struct.pack(">LBB", 2, context_id, control)
                elif not taken:
                    out += body[pos : pos + 4 + item_len]
            pos += 4 + item_len
        return body if out is None else out

    def _command_complete(self, context_id: int, whole: bool) -> bool:
        """A command set is complete; True when its C-STORE request is taken past pynetdicom."""
        raw, self._command = bytes(self._command), bytearray()
        self._store = None
        cmd = command_fields(raw)
        if cmd is None:
            return False  # pynetdicom decodes the same bytes and handles the error
        if cmd.get(0x0100) != C_STORE_RQ or cmd.get(0x0800, NO_DATASET) == NO_DATASET:
            return False
        sop_class, sop_instance = str(cmd.get(0x0002, "")), str(cmd.get(0x1000, ""))
        self._store = (context_id, sop_class, sop_instance)
        if self.on_store is None or not whole or not isinstance(cmd.get(0x0110), int) or not sop_instance:
            return False
        context = self.assoc._accepted_cx.get(context_id)
        if context is None or context.abstract_syntax != sop_class:
            return False  # pynetdicom answers what does not fit
        if self.dul.state_machine.current_state != "Sta6":  # established, not releasing
            return False
        self._taken = int(cmd[0x0110])
        return True

    def _dataset(self, fragment: memoryview, last: bool) -> None:
        assert self._store is not None
        context_id, sop_class, sop_instance = self._store
        if self._spool is None:
            context = self.assoc._accepted_cx.get(context_id)
            if context is None:
                raise WireRefusal("cannot_parse", f"data set on presentation context {context_id}, not accepted")
            transfer_syntax = str(context.transfer_syntax[0])
            self._spool = Spool(self.spool_directory, sop_class, sop_instance, transfer_syntax)
            self._scan = PixelLengthScan(transfer_syntax)
        spool = self._spool
        if spool.size + len(fragment) > self.max_instance_bytes:
            raise WireRefusal(
                "instance_too_large", f"the data set passes {self.max_instance_bytes} bytes (per-instance limit)"
            )
        spool.write(fragment)
        if self._scan is not None and self._scan.active:
            declared = self._scan.feed(fragment)
            if declared is not None and declared != UNDEFINED and declared > self.max_instance_bytes:
                raise WireRefusal(
                    "image_too_large",
                    f"Pixel Data declares {declared} bytes, more than the per-instance limit {self.max_instance_bytes}",
                )
        if last:
            spool.complete = True
            taken, self._taken = self._taken, None
            if taken is not None:  # handled on this thread once this PDU is read (read_pdu)
                self._ready.append(StoreRequest(context_id, taken, sop_class, sop_instance, spool))
            with self._lock:
                if taken is None:  # the handler takes it (Wire.take)
                    self._done.append(spool)
                self._spool = None
            self._store = None
            self._scan = None


# --- the server ----------------------------------------------------------------------------------
class SharedContexts(list):  # type: ignore[type-arg]
    """The server's supported presentation contexts. pynetdicom deep-copies them for every new
    association (RequestHandler._create_association): ~11 ms of CPU per association for our ~150
    storage classes x 14 transfer syntaxes (measured: 31 -> 20 ms per association + image). Negotiation
    only reads them (presentation.negotiate_as_acceptor builds new result contexts) and no handler of
    ours changes them, so each association gets a new list of the same context objects."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[Any]:
        return list(self)


class GuardedServer(ThreadedAssociationServer):
    """ThreadedAssociationServer + TCP_NODELAY + a bound on connections still waiting to associate."""

    max_pending = 16
    shared_socket: socket.socket | None = None  # set by sharing(): a listening socket of several processes

    @classmethod
    def sharing(cls, sock: socket.socket) -> type[GuardedServer]:
        """This server class accepting from an already listening (non-blocking) socket that other
        worker processes accept from too: a worker that loses the race gets EAGAIN, which
        socketserver ignores, and waits for the next connection."""
        return type("SharedGuardedServer", (cls,), {"shared_socket": sock})

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._pending: dict[socket.socket, tuple[float, str]] = {}
        self._pending_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        self.contexts = SharedContexts(self.contexts)

    def server_bind(self) -> None:
        if self.shared_socket is None:
            super().server_bind()
            return
        self.socket.close()
        self.socket = self.shared_socket
        self.socket.setblocking(False)
        self.server_address = self.socket.getsockname()

    def server_activate(self) -> None:
        if self.shared_socket is None:
            super().server_activate()  # a shared socket is listening already

    def get_request(self) -> tuple[socket.socket, Any]:
        sock, address = super().get_request()
        sock.setblocking(True)  # the shared listening socket is non-blocking; the connection is not
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, address

    def verify_request(self, request: Any, client_address: Any) -> bool:
        peer = str(client_address[0]) if isinstance(client_address, tuple) else str(client_address)
        evict: list[tuple[socket.socket, str]] = []
        with self._pending_lock:
            for sock in [s for s in self._pending if s.fileno() < 0]:
                del self._pending[sock]
            while len(self._pending) >= self.max_pending:
                oldest = min(self._pending, key=lambda s: self._pending[s][0])
                evict.append((oldest, self._pending.pop(oldest)[1]))
            self._pending[request] = (time.monotonic(), peer)
        for sock, who in evict:
            log.warning(
                "connection closed: no association request while others wait",
                extra={"peer": who, "pending_limit": self.max_pending},
            )
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return True

    def requested(self, sock: socket.socket | None) -> None:
        """The connection sent its A-ASSOCIATE-RQ: it no longer counts as pending."""
        if sock is not None:
            with self._pending_lock:
                self._pending.pop(sock, None)

    def pending_count(self) -> int:
        with self._pending_lock:
            return sum(1 for s in self._pending if s.fileno() >= 0)


# --- event-driven reactors ------------------------------------------------------------------------
# pynetdicom's two threads per association poll: the DUL thread sleeps 1 ms whenever it found nothing
# to do, the association thread sleeps 1 ms on every loop. Measured: ~3.4 % of a core per idle
# association, and up to a millisecond per hand-over. For our associations these 1 ms sleeps wait
# instead until there is work (a queue item, data on the socket), at most REACTOR_WAIT_S, so timers
# and thread exits are still noticed.
REACTOR_WAIT_S = 0.01
POLL_S = 0.001  # the sleep both pynetdicom reactors use (other sleeps are left alone)


class _WakingQueue(queue.Queue):  # type: ignore[type-arg]
    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class Waker:
    """Wakes one association's reactor threads when there is work for them."""

    def __init__(self, assoc: Any) -> None:
        self.user = threading.Event()  # the association thread: something in one of its queues
        self._r, self._w = socket.socketpair()  # the DUL thread: a primitive to send or an event to run
        self._r.setblocking(False)
        self._w.setblocking(False)
        dul = assoc.dul
        for owner, name, wake in (
            (dul, "to_user_queue", self.user.set),  # A-ASSOCIATE, A-RELEASE, A-ABORT indications
            (assoc.dimse, "msg_queue", self.user.set),  # complete DIMSE messages (the DUL thread decodes)
            (dul, "to_provider_queue", self.wake_provider),  # primitives to send
            (dul, "event_queue", self.wake_provider),  # state machine events, e.g. Evt17 from a close
        ):
            old: queue.Queue[Any] = getattr(owner, name)
            new = _WakingQueue(wake)
            new.queue.extend(old.queue)  # (Evt5 is already there: the connection was made)
            setattr(owner, name, new)
        assoc._pt_waker = self
        dul._pt_waker = self

    def wake_provider(self) -> None:
        with contextlib.suppress(OSError):
            self._w.send(b"\x00")

    def wait_provider(self, dul: Any) -> None:
        sock = getattr(dul.socket, "socket", None) if dul.socket is not None else None
        waits = [self._r] if sock is None or sock.fileno() < 0 else [sock, self._r]
        try:
            ready, _, _ = select.select(waits, [], [], REACTOR_WAIT_S)
        except (OSError, ValueError):
            time.sleep(POLL_S)
            return
        if self._r in ready:
            with contextlib.suppress(OSError):
                while self._r.recv(4096):
                    pass

    def wait_user(self) -> None:
        if self.user.wait(REACTOR_WAIT_S):
            self.user.clear()

    def close(self) -> None:
        self._r.close()
        self._w.close()


class _ReactorTime:
    """Stands in for the `time` module inside pynetdicom.dul and pynetdicom.association."""

    def __init__(self, real: Any) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        waker: Waker | None = getattr(thread, "_pt_waker", None)
        if waker is None or seconds != POLL_S:
            self._real.sleep(seconds)
        elif isinstance(thread, DULServiceProvider):
            waker.wait_provider(thread)
        else:
            waker.wait_user()


def install_reactor_wakeups() -> None:
    """Route pynetdicom's reactor polls through _ReactorTime (idempotent; other associations in the
    process, which have no Waker, keep their plain sleeps)."""
    import pynetdicom.association
    import pynetdicom.dul

    for module in (pynetdicom.dul, pynetdicom.association):
        if not isinstance(module.time, _ReactorTime):
            module.time = _ReactorTime(module.time)  # type: ignore[assignment]
