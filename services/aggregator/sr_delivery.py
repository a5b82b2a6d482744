"""SR delivery as its own supervised queue (issue 23, item 2): one sender per destination.

- **Timeouts per destination**: TCP connect, ACSE (the answer to A-ASSOCIATE-RQ) and DIMSE (each
  C-STORE response). A PACS that accepts TCP and never answers costs one ACSE timeout per
  attempt, not one per pending SR.
- **Several SRs per association** (`sr_batch_size`), in queue order with URGENT studies first and
  each study's chain in order.
- **Circuit breaker with backoff and jitter**: a failed association opens the breaker; no attempt
  is made until the back-off (retry interval x 2^(failures-1), capped, jittered to 50-100 %) has
  passed; the next attempt is the half-open probe. A permanent rejection (A-ASSOCIATE-RJ result 1,
  e.g. our AE title not known there) waits the longest back-off at once: it needs a person.
- **One log line per state change**: the decoded reason (refused, timeout, rejected: result,
  source and reason of the A-ASSOCIATE-RJ, aborted, C-STORE status) is logged when the
  destination's state or reason changes, not per attempt; pynetdicom's own per-attempt error lines
  are kept out of the log while a send runs.
- **Metrics**: pending, age of the oldest pending, sent, failures by reason, breaker state.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import Counter, Gauge

from services.aggregator.sr import Destination, decode_sr

log = logging.getLogger("services.aggregator.sr_delivery")

# Fixed set of failure reasons (metric label values).
REASONS = ("connect", "timeout", "rejected", "aborted", "no_context", "dimse_timeout", "status", "error")

SR_PENDING = Gauge("pt_aggregator_sr_pending", "SR deliveries not sent yet (held or frozen)", ["destination"])
SR_OLDEST_AGE = Gauge(
    "pt_aggregator_sr_oldest_pending_seconds",
    "Age of the oldest SR delivery not sent yet (0 when none)",
    ["destination"],
)
SR_SENT = Counter("pt_aggregator_sr_sent_total", "SRs the destination stored", ["destination"])
SR_FAILURES = Counter(
    "pt_aggregator_sr_failures_total",
    "Failed SR delivery attempts (one per association) by reason",
    ["destination", "reason"],
)
SR_BREAKER_OPEN = Gauge(
    "pt_aggregator_sr_breaker_open",
    "1 while the destination's circuit breaker is open (no attempts until back-off)",
    ["destination"],
)

STORE_OK = (0x0000, 0xB000, 0xB006, 0xB007)


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 5.0
    acse_s: float = 10.0
    dimse_s: float = 30.0


@dataclass
class BatchResult:
    """What one association did: the delivery ids stored, and the failure that ended it, if any."""

    sent: list[int] = field(default_factory=list)
    failed_id: int | None = None  # the SR whose C-STORE failed (None: the association itself failed)
    reason: str | None = None  # one of REASONS
    detail: str = ""
    permanent: bool = False  # a permanent A-ASSOCIATE-RJ: retrying soon will not help
    skipped_objects: int = 0  # heatmap SCs not sent: the peer accepted no Secondary Capture context


class _PynetdicomMute(logging.Filter):
    """While an SR send runs, pynetdicom's own lines (one set per attempt) are kept out of the log;
    the last TCP error text is kept for our own, decoded line."""

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.lock = threading.Lock()
        self.last_tcp_error = ""

    def filter(self, record: logging.LogRecord) -> bool:
        if self.active <= 0:
            return True
        message = record.getMessage()
        if message.startswith("TCP Initialisation Error:"):
            self.last_tcp_error = message.split(":", 1)[1].strip()
        return False


_MUTE = _PynetdicomMute()
for _name in (
    "pynetdicom.acse",
    "pynetdicom.transport",
    "pynetdicom.association",
    "pynetdicom.dimse",
    "pynetdicom.dul",
):
    logging.getLogger(_name).addFilter(_MUTE)


def send_batch(
    items: list[tuple[int, bytes]],
    dest: Destination,
    calling_ae: str,
    timeouts: Timeouts,
    extras: dict[int, list[bytes]] | None = None,
) -> BatchResult:
    """C-STORE frozen SRs over one association (blocking; run it in a thread).

    `extras`: per delivery id, other frozen objects (heatmap Secondary Captures) stored before its
    SR on the same association, which then also proposes Secondary Capture Image Storage. A
    delivery counts as sent only once its objects and its SR are stored; a failure retries them all
    (the same bytes). A PACS that accepts no Secondary Capture context still gets the SRs.
    """
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE, evt
    from pynetdicom.pdu_primitives import A_ABORT, A_ASSOCIATE, A_P_ABORT
    from pynetdicom.sop_class import BasicTextSRStorage, SecondaryCaptureImageStorage  # type: ignore[attr-defined]

    extras = {k: v for k, v in (extras or {}).items() if v}

    result = BatchResult()
    seen: dict[str, Any] = {"opened": False, "primitive": None}

    def on_open(event: Any) -> None:
        seen["opened"] = True

    def on_acse(event: Any) -> None:
        if isinstance(event.primitive, A_ASSOCIATE | A_ABORT | A_P_ABORT):
            seen["primitive"] = event.primitive

    handlers: list[tuple[Any, Callable[..., None]]] = [(evt.EVT_CONN_OPEN, on_open), (evt.EVT_ACSE_RECV, on_acse)]
    ae = AE(ae_title=calling_ae)
    ae.connection_timeout = timeouts.connect_s
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = max(timeouts.acse_s, timeouts.dimse_s)
    ae.add_requested_context(BasicTextSRStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    if extras:
        ae.add_requested_context(SecondaryCaptureImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    with _MUTE.lock:
        _MUTE.active += 1
        _MUTE.last_tcp_error = ""
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, evt_handlers=handlers)
        if not assoc.is_established:
            prim = seen["primitive"]
            if not seen["opened"]:
                result.reason, result.detail = "connect", _MUTE.last_tcp_error or "TCP connection failed"
            elif assoc.is_rejected and isinstance(prim, A_ASSOCIATE):
                result.reason = "rejected"
                result.permanent = prim.result == 0x01
                result.detail = f"{prim.result_str} by {prim.source_str}: {prim.reason_str}"
            elif isinstance(prim, A_ASSOCIATE) and prim.result == 0x00:
                result.reason, result.detail = "no_context", "the peer accepted no Basic Text SR context"
            elif isinstance(prim, A_ABORT | A_P_ABORT):
                result.reason, result.detail = "aborted", "the peer aborted the association request"
            elif prim is None:
                result.reason, result.detail = (
                    "timeout",
                    f"no answer to the association request in {timeouts.acse_s:g} s",
                )
            else:
                result.reason, result.detail = "error", f"association not established ({type(prim).__name__})"
            return result
        try:
            sc_ok = any(
                cx.abstract_syntax == SecondaryCaptureImageStorage and cx.result == 0x00
                for cx in assoc.accepted_contexts
            )
            if extras and not sc_ok:
                result.skipped_objects = sum(len(extras.get(i, [])) for i, _ in items)
            for delivery_id, data in items:
                code = 0x0000
                for obj in extras.get(delivery_id, []) if sc_ok else []:  # the heatmap SCs, then the SR
                    status = assoc.send_c_store(decode_sr(obj))
                    code = int(getattr(status, "Status", -1)) if status else -1
                    if code not in STORE_OK:
                        break
                if code in STORE_OK:
                    status = assoc.send_c_store(decode_sr(data))
                    code = int(getattr(status, "Status", -1)) if status else -1
                if code in STORE_OK:
                    result.sent.append(delivery_id)
                    continue
                result.failed_id = delivery_id
                if code >= 0:
                    result.reason, result.detail = "status", f"C-STORE status 0x{code:04X}"
                elif assoc.is_aborted and isinstance(seen["primitive"], A_ABORT | A_P_ABORT):
                    result.reason, result.detail = "aborted", "the peer aborted the association during a C-STORE"
                else:
                    result.reason = "dimse_timeout"
                    result.detail = f"no C-STORE response in {timeouts.dimse_s:g} s"
                break
        finally:
            if assoc.is_established:
                assoc.release()
        return result
    except Exception as exc:  # a bug or an odd peer: one failure, never a dead sender
        result.reason, result.detail = "error", repr(exc)[:500]
        return result
    finally:
        with _MUTE.lock:
            _MUTE.active -= 1


class DestinationBreaker:
    """Circuit breaker and back-off of one destination; logs once per state (or reason) change."""

    def __init__(self, dest: Destination, base_s: float, max_s: float, clock: Callable[[], float] = time.monotonic):
        self.dest = dest
        self.label = dest.label
        self.base_s = max(0.01, base_s)
        self.max_s = max(self.base_s, max_s)
        self.clock = clock
        self.state = "closed"  # closed | open (half-open: the first attempt after the back-off)
        self.failures = 0
        self.next_attempt = 0.0
        self.reason = ""
        self.detail = ""
        self.down_since: float | None = None
        self._logged: tuple[str, str, str] = ("closed", "", "")
        SR_BREAKER_OPEN.labels(self.label).set(0)

    def may_attempt(self) -> bool:
        return self.state == "closed" or self.clock() >= self.next_attempt

    def seconds_to_attempt(self) -> float:
        return 0.0 if self.state == "closed" else max(0.0, self.next_attempt - self.clock())

    def failure(self, result: BatchResult, pending: int) -> None:
        reason = result.reason or "error"
        SR_FAILURES.labels(self.label, reason).inc()
        self.failures += 1
        delay = self.max_s if result.permanent else min(self.max_s, self.base_s * 2 ** (self.failures - 1))
        delay *= random.uniform(0.5, 1.0)  # jitter: replicas and destinations do not retry in step
        now = self.clock()
        self.next_attempt = now + delay
        if self.state == "closed":
            self.down_since = now
        self.state, self.reason, self.detail = "open", reason, result.detail
        SR_BREAKER_OPEN.labels(self.label).set(1)
        if self._logged != ("open", reason, result.detail):
            self._logged = ("open", reason, result.detail)
            log.error(
                "SR destination not accepting SRs",
                extra={
                    "destination": self.label,
                    "reason": reason,
                    "detail": result.detail,
                    "permanent": result.permanent,
                    "pending": pending,
                    "retry_in_s": round(delay, 1),
                },
            )

    def success(self, pending: int) -> None:
        if self.state != "closed":
            down = self.clock() - self.down_since if self.down_since is not None else 0.0
            log.warning(
                "SR destination accepting SRs again",
                extra={
                    "destination": self.label,
                    "after_failures": self.failures,
                    "down_s": round(down, 1),
                    "pending": pending,
                },
            )
        self.state, self.failures, self.reason, self.detail, self.down_since = "closed", 0, "", "", None
        self._logged = ("closed", "", "")
        SR_BREAKER_OPEN.labels(self.label).set(0)

    def describe(self) -> dict[str, Any]:
        return {
            "destination": self.label,
            "state": self.state,
            "reason": self.reason,
            "detail": self.detail,
            "consecutive_failures": self.failures,
            "next_attempt_in_s": round(self.seconds_to_attempt(), 1),
        }
