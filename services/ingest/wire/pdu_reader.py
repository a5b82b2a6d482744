"""The fast path's PDU reader (PT_INGEST_FAST_PATH=true): replaces one association's DUL PDU reader.

pynetdicom reads every PDU whole into memory, whatever length its header declares, and collects a
C-STORE data set until its last fragment. `Wire.read_pdu` instead:

- aborts a P-DATA-TF PDU longer than the negotiated maximum (PT_INGEST_MAX_PDU_BYTES), or any other
  PDU over 1 MiB, before its body is read; and a PDU not received whole within PT_INGEST_PDU_TIMEOUT_S
  of its first byte (bytes trickling in do not extend it), so a stalled peer holds its threads and
  socket for a bounded time;
- runs every PDV through the association's `MessageGuard` (messages.py): Annex E order and the
  per-message limits, the association aborted on any breach;
- takes a C-STORE request whose command set arrives in one fragment past pynetdicom's DIMSE layer:
  its data set is written to a spool file as it arrives (hashed on the way) and neither its command
  nor its data set reaches pynetdicom; once complete, `on_store` runs on this (the DUL) thread and
  answers with `send_command` (this thread sends every PDU of the association, so nothing
  interleaves). ~1.3-1.9 ms of CPU less per instance (docs/performance.md).

Everything else (C-ECHO, a command in several fragments, release, abort) goes to pynetdicom as the
same bytes, through its own decoder, state machine and DIMSE provider.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.ingest.wire.activity import Activity
from services.ingest.wire.messages import Message, MessageGuard, WireRefusal
from services.ingest.wire.spool import Spool

log = logging.getLogger(__name__)

P_DATA_TF = 0x04
A_RELEASE_RQ = 0x05
A_ABORT = 0x07
MAX_OTHER_PDU = 1 << 20  # A-ASSOCIATE-RQ with ~130 presentation contexts is ~30 KiB


class _PduTimeout(Exception):
    pass


@dataclass
class StoreRequest:
    """A whole C-STORE request taken past pynetdicom's DIMSE layer."""

    context_id: int
    message_id: int
    sop_class_uid: str
    sop_instance_uid: str
    abstract_syntax: str  # of the presentation context it came on
    spool: Spool
    priority: int = 0  # the request's Priority (0000,0700): 0 MEDIUM, 1 HIGH, 2 LOW (lane rules)


def accepted_context(assoc: Any, context_id: int) -> Any:
    """The accepted presentation context with this ID, or None (pynetdicom's public list, indexed once)."""
    table: dict[int, Any] | None = getattr(assoc, "_pt_contexts", None)
    if table is None:
        contexts = list(assoc.accepted_contexts)
        if not contexts:
            return None  # not negotiated yet: do not cache an empty table
        table = {int(cx.context_id): cx for cx in contexts}
        assoc._pt_contexts = table
    return table.get(context_id)


class Wire:
    """Replaces `assoc.dul._read_pdu_data` for one association (see the module docstring)."""

    def __init__(
        self,
        assoc: Any,
        spool_directory: Path,
        max_pdu: int,
        max_instance_bytes: int,
        on_refused: Callable[[str], None],
        on_store: Callable[[Wire, StoreRequest], None] | None = None,
        pdu_timeout_s: float = 30.0,
        activity: Activity | None = None,
    ) -> None:
        self.assoc = assoc
        self.dul = assoc.dul
        self.max_pdu = max_pdu
        self.pdu_timeout_s = pdu_timeout_s
        self.on_refused = on_refused
        self.on_store = on_store
        self.activity = activity or Activity()
        self.aborted = False
        self.guard = MessageGuard(
            lambda context_id: accepted_context(assoc, context_id),
            max_instance_bytes,
            spool_directory,
            take=self._take,
        )

    @classmethod
    def install(cls, assoc: Any, **kwargs: Any) -> Wire:
        wire = cls(assoc, **kwargs)
        assoc.dul._read_pdu_data = wire.read_pdu
        assoc._pt_wire = wire
        return wire

    @staticmethod
    def of(assoc: Any) -> Wire | None:
        return getattr(assoc, "_pt_wire", None)

    def close(self) -> None:
        """Discard whatever is still spooled (association over)."""
        self.guard.close()

    def _take(self, message: Message) -> bool:
        """Whether this C-STORE request is handled here rather than by pynetdicom's DIMSE layer."""
        if self.on_store is None or not message.single_fragment_command:
            return False
        if message.message_id is None or not message.sop_instance_uid or not message.sop_class_uid:
            return False  # pynetdicom answers what is missing
        return bool(self.dul.state_machine.current_state == "Sta6")  # established, not releasing

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

    # --- reading ---------------------------------------------------------------------------------
    def _recv(self, n: int, deadline: float) -> bytearray:
        """n bytes (fewer when the peer closed); _PduTimeout when they do not all come by `deadline`."""
        sock: socket.socket = self.dul.socket.socket
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        saved = sock.gettimeout()
        try:
            while got < n:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise _PduTimeout
                sock.settimeout(remaining if saved is None else min(saved, remaining))
                try:
                    k = sock.recv_into(view[got:], n - got)
                except TimeoutError:
                    if time.monotonic() >= deadline:
                        raise _PduTimeout from None
                    raise
                if k == 0:
                    return buf[:got]
                got += k
        finally:
            sock.settimeout(saved)
        return buf

    def read_pdu(self) -> None:
        """pynetdicom's `_read_pdu_data` with limits, the message guard and the taken C-STOREs
        (the same events on the same queue)."""
        dul = self.dul
        if self.aborted:  # Sta13 after our A-ABORT: do not read what the peer still sends
            dul.socket.close()
            return
        started = time.monotonic()
        self.activity.reading_since = started
        try:
            self._read(started + self.pdu_timeout_s)
        except _PduTimeout:
            self._abort("pdu_timeout", f"a PDU not received whole within {self.pdu_timeout_s:g} s")
        finally:
            self.activity.reading_since = None

    def _read(self, deadline: float) -> None:
        dul = self.dul
        try:
            header = self._recv(6, deadline)
        except OSError:
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
            body = self._recv(length, deadline)
        except OSError:
            dul.event_queue.put("Evt17")
            return
        if len(body) != length:
            dul.event_queue.put("Evt17")
            return
        self.activity.pdu_received()
        if pdu_type == P_DATA_TF:
            try:
                body, ready = self._p_data(body)
            except WireRefusal as exc:
                self._abort(exc.code, exc.reason)
                return
            except Exception as exc:  # never let the DUL thread die on what a peer sent
                log.exception("cannot handle a P-DATA PDU")
                self.guard.close()
                self._abort("internal_error", f"{type(exc).__name__}")
                return
            for request in ready:
                assert self.on_store is not None
                self.on_store(self, request)  # never raises (scp.py answers every request)
            if not body:  # every fragment was taken: nothing for pynetdicom
                return
            header[2:6] = struct.pack(">L", len(body))
        elif pdu_type in (A_RELEASE_RQ, A_ABORT):
            self.guard.release()  # an incomplete message ends here
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
        self.guard.close()
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

    def _p_data(self, body: bytearray) -> tuple[bytearray, list[StoreRequest]]:
        """The PDVs of one P-DATA-TF through the guard: the body without the taken messages' PDVs,
        and the C-STORE requests this PDU completed."""
        out: bytearray | None = None
        ready: list[StoreRequest] = []
        pos, end = 0, len(body)
        view = memoryview(body)
        try:
            while pos < end:
                if pos + 6 > end:
                    raise WireRefusal("cannot_parse", "a PDV item shorter than its header")
                (item_len,) = struct.unpack_from(">L", body, pos)
                if item_len < 2 or pos + 4 + item_len > end:
                    raise WireRefusal("cannot_parse", "a PDV item longer than its PDU")
                context_id, control = body[pos + 4], body[pos + 5]
                message, done = self.guard.pdv(context_id, control, view[pos + 6 : pos + 4 + item_len])
                if message.taken:
                    if out is None:
                        out = bytearray(body[:pos])
                    if done:
                        assert message.spool is not None and message.message_id is not None
                        context = accepted_context(self.assoc, message.context_id)
                        ready.append(
                            StoreRequest(
                                message.context_id,
                                message.message_id,
                                message.sop_class_uid,
                                message.sop_instance_uid,
                                str(context.abstract_syntax),
                                message.spool,
                                int((message.fields or {}).get(0x0700, 0) or 0),
                            )
                        )
                elif out is not None:
                    out += body[pos : pos + 4 + item_len]
                pos += 4 + item_len
        except BaseException:
            for request in ready:  # complete, but never answered: nothing was acknowledged
                request.spool.discard()
            raise
        return (body if out is None else out), ready
