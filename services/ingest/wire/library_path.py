"""pynetdicom's own path (PT_INGEST_FAST_PATH=false, or a pynetdicom whose internals the fast path
needs have changed: internals.py): pynetdicom reads every PDU, decodes every DIMSE message and calls
the C-STORE handler with its data set in a temporary file (its documented
`_config.STORE_RECV_CHUNKED_DATASET`). Only public hooks are used:

- `EVT_DATA_RECV` (every PDU's bytes, before pynetdicom decodes them) feeds the association's
  `MessageGuard` (messages.py), the same order and per-message rules the fast path enforces; on a
  breach the association is aborted (`Association.abort(block=False)`, as pynetdicom documents for
  handlers) and `violated` tells the C-STORE handler to store nothing more from it;
- nothing else of pynetdicom is replaced. What only the fast path adds is listed in
  docs/dicom-conformance.md (a PDU longer than the limit is read whole before it is refused; a
  stalled PDU holds its association until pynetdicom's network timeout).
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable
from typing import Any

from pynetdicom import evt

from services.ingest.wire.activity import Activity
from services.ingest.wire.messages import MessageGuard, WireRefusal
from services.ingest.wire.pdu_reader import A_ABORT, A_RELEASE_RQ, P_DATA_TF, accepted_context

log = logging.getLogger(__name__)


class LibraryGuard:
    """The message guard on pynetdicom's own path, for one association."""

    def __init__(
        self, assoc: Any, max_instance_bytes: int, on_refused: Callable[[str], None], activity: Activity
    ) -> None:
        self.assoc = assoc
        self.on_refused = on_refused
        self.activity = activity
        self.violated: WireRefusal | None = None
        self.guard = MessageGuard(lambda context_id: accepted_context(assoc, context_id), max_instance_bytes)

    @classmethod
    def install(cls, assoc: Any, **kwargs: Any) -> LibraryGuard:
        guard = cls(assoc, **kwargs)
        assoc._pt_library_guard = guard
        assoc.bind(evt.EVT_DATA_RECV, guard.on_data)
        return guard

    @staticmethod
    def of(assoc: Any) -> LibraryGuard | None:
        return getattr(assoc, "_pt_library_guard", None)

    def close(self) -> None:
        self.guard.close()

    def on_data(self, event: evt.Event) -> None:
        data: bytes = event.data
        self.activity.pdu_received()
        if self.violated is not None or len(data) < 6:
            return
        if data[0] in (A_RELEASE_RQ, A_ABORT):
            self.guard.release()
            return
        if data[0] != P_DATA_TF:
            return
        try:
            pos, end = 6, len(data)
            while pos < end:
                if pos + 6 > end:
                    raise WireRefusal("cannot_parse", "a PDV item shorter than its header")
                (item_len,) = struct.unpack_from(">L", data, pos)
                if item_len < 2 or pos + 4 + item_len > end:
                    raise WireRefusal("cannot_parse", "a PDV item longer than its PDU")
                self.guard.pdv(data[pos + 4], data[pos + 5], memoryview(data)[pos + 6 : pos + 4 + item_len])
                pos += 4 + item_len
        except WireRefusal as exc:
            self.violated = exc
            log.warning(
                "DICOM association aborted",
                extra={"reason_code": exc.code, "reason": exc.reason, "path": "pynetdicom"},
            )
            self.on_refused(exc.code)
            self.assoc.abort(block=False)
