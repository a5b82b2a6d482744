"""The order of DIMSE message fragments on one association, and what one message may carry: the one
place that enforces "one C-STORE, one file".

PS3.8 Annex E: a message is its command set, in one or more command fragments, then (when the command
says so) its data set, in one or more data-set fragments, all on one presentation context; "no
fragments of any other messages shall be sent until all fragments of the current message have been
sent". `MessageGuard` sees every presentation-data value (PDV) of an association in order and refuses
(`WireRefusal`, the caller aborts the association) anything else:

- a data-set fragment when no command announced one (before any command, or after a complete message);
- a command fragment while the current message's data set is incomplete (the spliced-file defect:
  pynetdicom's own in-memory path appends the second message's data set to the first one's);
- a fragment on another presentation context than its message's, or on one that was not accepted;
- a command set that does not decode, or names a DIMSE command we do not know;
- more PDVs than the bytes they carry justify (a flood of empty PDVs costs CPU, not bandwidth);
- a C-STORE data set past the per-instance byte limit, or whose Pixel Data declares more;
  a data set of any other request past 1 MiB.

A message is one `Message` object: its command bytes, its counters and, when the fast path took its
C-STORE, its spool file. The guard holds at most one; whatever ends it (complete, refused, released,
aborted, closed) goes through `_end`, which discards the spool unless the complete data set was handed
to the C-STORE handler. No spool outlives its message, and no message sees another one's bytes.

Both DIMSE paths use it: the fast path's PDU reader (pdu_reader.py) and, on pynetdicom's own path, a
handler of pynetdicom's EVT_DATA_RECV (library_path.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from services.ingest.wire.dimse_codec import C_STORE_RQ, KNOWN_COMMANDS, NO_DATASET, command_fields
from services.ingest.wire.pixel_scan import UNDEFINED, PixelLengthScan
from services.ingest.wire.spool import Spool

log = logging.getLogger(__name__)

MAX_COMMAND_BYTES = 1 << 16
MAX_NON_STORE_DATASET = 1 << 20  # a data set of any other DIMSE request (we support none with one)
# PDVs per message: this many, plus one per PDV_BYTES carried. Real senders fill PDUs of 4 KiB or
# more; an empty-PDV flood is refused long before it costs a noticeable share of a core.
FREE_PDVS = 64
PDV_BYTES = 256


class WireRefusal(Exception):
    """What a peer sent breaks the protocol or a limit: the association is aborted."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(reason)
        self.code, self.reason = code, reason


@dataclass
class Message:
    """One DIMSE message as it arrives."""

    context_id: int
    command: bytearray = field(default_factory=bytearray)
    fields: dict[int, int | str] | None = None  # once the command set is complete
    single_fragment_command: bool = False
    data_bytes: int = 0
    pdvs: int = 0
    scan: PixelLengthScan | None = None
    spool: Spool | None = None  # the fast path's file for a C-STORE it took
    taken: bool = False  # the fast path handles this C-STORE (its fragments never reach pynetdicom)

    @property
    def command_complete(self) -> bool:
        return self.fields is not None

    @property
    def is_store(self) -> bool:
        return self.fields is not None and self.fields.get(0x0100) == C_STORE_RQ

    @property
    def message_id(self) -> int | None:
        value = (self.fields or {}).get(0x0110)
        return value if isinstance(value, int) else None

    @property
    def sop_class_uid(self) -> str:
        return str((self.fields or {}).get(0x0002, ""))

    @property
    def sop_instance_uid(self) -> str:
        return str((self.fields or {}).get(0x1000, ""))


class MessageGuard:
    """PS3.8 Annex E order and per-message limits for one association (see the module docstring).

    `context(context_id)` returns the accepted presentation context (pynetdicom's, with
    `abstract_syntax` and `transfer_syntax`) or None. `take(message)` is asked once a command set is
    complete: True when the fast path handles that C-STORE itself (the guard then spools its data set
    into `spool_directory`). `pdv()` returns the message the PDV belongs to and whether that PDV
    completed it."""

    def __init__(
        self,
        context: Callable[[int], Any],
        max_instance_bytes: int,
        spool_directory: Path | None = None,
        take: Callable[[Message], bool] | None = None,
    ) -> None:
        self.context = context
        self.max_instance_bytes = max_instance_bytes
        self.spool_directory = spool_directory
        self.take = take
        self.current: Message | None = None
        self.refused: WireRefusal | None = None

    # --- one PDV ---------------------------------------------------------------------------------
    def pdv(self, context_id: int, control: int, fragment: bytes | memoryview) -> tuple[Message, bool]:
        """Account for one PDV (raises WireRefusal, after which the guard refuses everything)."""
        if self.refused is not None:
            raise self.refused
        try:
            return self._pdv(context_id, control, fragment)
        except WireRefusal as exc:
            self.refused = exc
            self._end()
            raise

    def _pdv(self, context_id: int, control: int, fragment: bytes | memoryview) -> tuple[Message, bool]:
        if self.context(context_id) is None:
            raise WireRefusal("cannot_parse", f"a PDV on presentation context {context_id}, which was not accepted")
        message = self.current
        last = bool(control & 2)
        if control & 1:  # a command fragment
            if message is None:
                message = self.current = Message(context_id, single_fragment_command=last)
            elif message.command_complete:
                raise WireRefusal("cannot_parse", "a command before the data set of the previous message was complete")
            self._same_context(message, context_id)
            self._count(message, len(fragment))
            message.command += fragment
            if len(message.command) > MAX_COMMAND_BYTES:
                raise WireRefusal("cannot_parse", "command set too long")
            if not last:
                return message, False
            self._command_complete(message)
            if message.fields is not None and message.fields.get(0x0800, NO_DATASET) == NO_DATASET:
                self.current = None  # complete: a command without a data set
                return message, True
            return message, False
        if message is None or not message.command_complete:
            raise WireRefusal("cannot_parse", "a data set fragment before its command set")
        self._same_context(message, context_id)
        self._count(message, len(fragment))
        self._data(message, fragment)
        if last:
            self.current = None
            if message.spool is not None:
                message.spool.complete = True  # handed to the C-STORE handler, which owns it now
            return message, True
        return message, False

    def _same_context(self, message: Message, context_id: int) -> None:
        if context_id != message.context_id:
            raise WireRefusal(
                "cannot_parse",
                f"fragments of one message on presentation contexts {message.context_id} and {context_id}",
            )

    def _count(self, message: Message, size: int) -> None:
        message.pdvs += 1
        carried = len(message.command) + message.data_bytes + size
        if message.pdvs > FREE_PDVS + carried // PDV_BYTES:
            raise WireRefusal("too_many_pdvs", f"{message.pdvs} PDVs carrying {carried} bytes in one message")

    def _command_complete(self, message: Message) -> None:
        fields = command_fields(bytes(message.command))
        if fields is None:
            raise WireRefusal("cannot_parse", "a command set that does not decode")
        if fields.get(0x0100) not in KNOWN_COMMANDS:
            raise WireRefusal("cannot_parse", f"unknown DIMSE command field {fields.get(0x0100)!r}")
        message.fields = fields
        if fields.get(0x0800, NO_DATASET) == NO_DATASET:
            return
        if message.is_store:
            context = self.context(message.context_id)
            message.scan = PixelLengthScan(str(context.transfer_syntax[0]))
            if self.take is not None and self.spool_directory is not None and self.take(message):
                message.taken = True
                message.spool = Spool(
                    self.spool_directory,
                    message.sop_class_uid,
                    message.sop_instance_uid,
                    str(context.transfer_syntax[0]),
                )

    def _data(self, message: Message, fragment: bytes | memoryview) -> None:
        message.data_bytes += len(fragment)
        if not message.is_store:
            if message.data_bytes > MAX_NON_STORE_DATASET:
                raise WireRefusal("dataset_too_large", "data set of a non-storage request too long")
            return
        if message.data_bytes > self.max_instance_bytes:
            raise WireRefusal(
                "instance_too_large", f"the data set passes {self.max_instance_bytes} bytes (per-instance limit)"
            )
        if message.spool is not None:
            message.spool.write(fragment)
        if message.scan is not None and message.scan.active:
            declared = message.scan.feed(fragment)
            if declared is not None and declared != UNDEFINED and declared > self.max_instance_bytes:
                raise WireRefusal(
                    "image_too_large",
                    f"Pixel Data declares {declared} bytes, more than the per-instance limit {self.max_instance_bytes}",
                )

    # --- the end of a message that did not complete -------------------------------------------
    def _end(self) -> None:
        message, self.current = self.current, None
        if message is not None and message.spool is not None:
            message.spool.discard()
            message.spool = None

    def release(self) -> None:
        """A-RELEASE-RQ, A-ABORT or the connection's end: an incomplete message is dropped."""
        self._end()

    close = release
