"""The DICOM Storage SCP (pynetdicom): C-ECHO and C-STORE, answered only after fsync + DB commit.

pynetdicom runs each association in two threads (network and DIMSE). Before a handler runs, wire.py
has bounded what the peer may send (PDU length, per-instance bytes, connections waiting to
associate) and written the data set to a spool file as it arrived. A C-STORE is handled on the
association's network thread when wire.py took it past pynetdicom's DIMSE layer (the usual case,
`_on_wire_store`), else on its DIMSE thread (`handle_store`), the same way either time: validate
the spooled file, move it into the content-addressed store (fsync, rename), then hand the
instance to the committer
(commit.py: instance + outbox rows in one transaction, group-committed with whatever the other
associations sent meanwhile) and wait for that commit before the status goes back. Refusals are
recorded on the service's event loop (asyncio.run_coroutine_threadsafe). The same SOP instance
arriving on two associations at once is serialised by a per-UID lock, and the commit finds a
stored instance again, so exactly one event is ever created for it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

from prometheus_client import Counter, Gauge, Histogram
from pydicom.dataset import Dataset
from pynetdicom import AE, AllStoragePresentationContexts, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.service_class import StorageServiceClass
from pynetdicom.sop_class import Verification
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.core.telemetry import bound_correlation_id
from services.ingest.commit import Committer, Conflict
from services.ingest.commitment import STORAGE_COMMITMENT_PUSH, StorageCommitmentSCP, parse_peers
from services.ingest.config import IngestSettings
from services.ingest.lane_rules import acquired_at, classify
from services.ingest.records import record_refusal
from services.ingest.store import ContentStore, StoredFile, StoreError
from services.ingest.transfer_syntaxes import ACCEPTED
from services.ingest.validate import (
    CANNOT_PARSE,
    DATASET_MISMATCH,
    DUPLICATE_SOP_INSTANCE,
    IMAGE_SOP_CLASSES,
    OUT_OF_RESOURCES,
    OUT_OF_SCOPE_CODE,
    SUCCESS,
    Action,
    Decision,
    decide,
)
from services.ingest.wire.activity import Activity
from services.ingest.wire.dimse_codec import c_store_rsp_command
from services.ingest.wire.internals import fast_path_usable
from services.ingest.wire.library_path import LibraryGuard
from services.ingest.wire.pdu_reader import StoreRequest, Wire
from services.ingest.wire.reactor import Waker, install_reactor_wakeups
from services.ingest.wire.server import GuardedServer
from services.ingest.wire.spool import Spool, clean_spool, spool_dir

log = logging.getLogger(__name__)
T = TypeVar("T")

RECEIVED = Counter("pt_ingest_received_total", "C-STORE requests answered with success, by outcome", ["outcome"])
REJECTED = Counter("pt_ingest_rejected_total", "C-STORE requests refused, by reason code", ["reason"])
DISCARDED = Counter(
    "pt_ingest_discarded_total",
    "C-STORE requests answered success but not stored (PT_INGEST_OUT_OF_SCOPE=accept-and-discard), by reason",
    ["reason"],
)
LANES = Counter("pt_ingest_lane_total", "Accepted images by the lane ingest chose (fresh | backfill)", ["lane"])
BYTES = Counter("pt_ingest_bytes_total", "Bytes of DICOM data written to the store")
STORE_LATENCY = Histogram(
    "pt_ingest_store_seconds",
    "Seconds from a complete C-STORE request to its answer (validate + fsync + commit)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
STORE_PATHS = Counter(
    "pt_ingest_store_requests_total",
    "C-STORE requests answered, by path: wire (taken past pynetdicom's DIMSE layer), dimse (pynetdicom's)",
    ["path"],
)
ASSOCIATIONS = Gauge("pt_ingest_associations_active", "Open DICOM associations")
ASSOCIATION_EVENTS = Counter("pt_ingest_associations_total", "Association outcomes", ["outcome"])


def status_dataset(status: int, comment: str = "") -> Dataset:
    ds = Dataset()
    ds.Status = status
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


class IngestSCP:
    def __init__(
        self,
        settings: IngestSettings,
        sessions: async_sessionmaker[AsyncSession],
        store: ContentStore,
        loop: asyncio.AbstractEventLoop,
        committer: Committer,
        on_commit: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self.store = store
        self.loop = loop
        self.on_commit = on_commit
        self.server: GuardedServer | None = None
        self.committer = committer
        self.spool_dir: Path = spool_dir(store.root)
        self._locks: dict[str, tuple[threading.Lock, list[int]]] = {}  # uid -> (lock, [holders + waiters])
        self._locks_guard = threading.Lock()
        self._open: set[int] = set()
        self._seen_calling_aes: set[str] = set()
        self._evict_lock = threading.Lock()
        # PT_INGEST_FAST_PATH, unless this pynetdicom lacks an internal the fast path touches
        self.fast_path = fast_path_usable(settings.fast_path)
        if self.fast_path:
            install_reactor_wakeups()
        self.commitment = StorageCommitmentSCP(
            settings.ae_title, parse_peers(settings.commitment_peers), sessions, self._on_loop, settings.acse_timeout_s
        )
        self.ae = self._make_ae()

    # --- set-up ---------------------------------------------------------------------------------
    def _make_ae(self) -> AE:
        s = self.settings
        # pynetdicom's "standard" handlers format a debug summary of every PDU and DIMSE message
        # whether or not debug logging is on (~7 % of an association thread's CPU, profiled); our
        # own log lines say what happened. Documented switch (pynetdicom configuration options).
        _config.LOG_HANDLER_LEVEL = "none"
        # pynetdicom's own path hands a C-STORE's data set to the handler in a file, not in memory
        # (its documented option); the fast path spools it itself.
        _config.STORE_RECV_CHUNKED_DATASET = True
        ae = AE(ae_title=s.ae_title)
        # pynetdicom counts every connection, associated or not, including those that have not sent
        # an A-ASSOCIATE-RQ and those being closed: idle sockets would lock modalities out. Our own
        # limits count negotiated associations only (_on_requested; the server bounds the rest), so
        # pynetdicom's check is kept out of the way.
        ae.maximum_associations = 1 << 20
        ae.maximum_pdu_size = s.max_pdu_bytes
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        ae.require_called_aet = True
        if s.allowed_calling_ae_list:
            ae.require_calling_aet = list(s.allowed_calling_ae_list)
        ae.add_supported_context(Verification)
        ae.add_supported_context(STORAGE_COMMITMENT_PUSH)  # N-ACTION in, N-EVENT-REPORT out (commitment.py)
        # X-ray and secondary capture classes first, then every other storage class: those are
        # negotiated so that a misrouted CT/MR/PDF gets a per-instance refusal with a reason (0x0122)
        # and an ImageRejected event, rather than an anonymous presentation-context rejection.
        others = [c.abstract_syntax for c in AllStoragePresentationContexts]
        for uid in [*sorted(IMAGE_SOP_CLASSES), *[u for u in others if u not in IMAGE_SOP_CLASSES]]:
            ae.add_supported_context(uid, list(ACCEPTED))  # transfer_syntaxes.py, in its order
        return ae

    def handlers(self) -> list[tuple[Any, Callable[..., Any]]]:
        return [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_CONN_CLOSE, self._on_connection_closed),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_C_ECHO, self.handle_echo),
            (evt.EVT_N_ACTION, self.commitment.handle_n_action),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]

    def start(self, listen_socket: socket.socket | None = None) -> None:
        """Start listening (the committer must be running); on `listen_socket` when the port is
        shared by several worker processes (workers.py), else on a socket of our own."""
        s = self.settings
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        if removed := clean_spool(self.spool_dir):
            log.info("removed stale spool files", extra={"count": removed})
        server_class = GuardedServer if listen_socket is None else GuardedServer.sharing(listen_socket)
        server = self.ae.make_server((s.host, s.port), evt_handlers=self.handlers(), server_class=server_class)
        server.max_pending = s.max_pending_connections
        self.ae._servers.append(server)  # as AE.start_server does; AssociationServer.shutdown removes it
        threading.Thread(target=server.serve_forever, name="ingest-dicom-accept", daemon=True).start()
        self.server = server
        log.info("DICOM SCP listening", extra={"ae_title": s.ae_title, "port": s.port, "host": s.host})

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def listening(self) -> bool:
        return self.server is not None and self.server.socket is not None and self.server.socket.fileno() >= 0

    def shutdown(self) -> None:
        """Stop accepting, let running associations finish (blocking: call from a worker thread)."""
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    # --- association events ---------------------------------------------------------------------
    def _on_connection(self, event: evt.Event) -> None:
        """A TCP connection (its association thread not started yet): short wait for the request,
        and the message guard: inside our PDU reader (fast path) or on pynetdicom's EVT_DATA_RECV."""
        assoc, s = event.assoc, self.settings
        assoc.acse_timeout = s.request_timeout_s
        activity = assoc._pt_activity = Activity()
        on_refused = lambda code: REJECTED.labels(code).inc()  # noqa: E731
        if not self.fast_path:
            LibraryGuard.install(
                assoc, max_instance_bytes=s.instance_byte_limit, on_refused=on_refused, activity=activity
            )
            return
        Wire.install(
            assoc,
            spool_directory=self.spool_dir,
            max_pdu=s.max_pdu_bytes,
            max_instance_bytes=s.instance_byte_limit,
            on_refused=on_refused,
            on_store=self._on_wire_store,
            pdu_timeout_s=s.pdu_timeout_s,
            activity=activity,
        )
        Waker(assoc)

    def _on_connection_closed(self, event: evt.Event) -> None:
        wire = Wire.of(event.assoc) or LibraryGuard.of(event.assoc)
        if wire is not None:
            wire.close()
        waker: Waker | None = getattr(event.assoc, "_pt_waker", None)
        if waker is not None:
            waker.close()

    def _negotiated(self, exclude: Any, peer: str | None = None) -> int:
        count = 0
        for a in self.ae.active_associations:
            if a is exclude or not a.is_acceptor or not getattr(a, "_pt_requested", False):
                continue
            if getattr(a, "_pt_evicted", False):
                continue
            if a.is_released or a.is_aborted or a.is_rejected:
                continue
            if peer is None or str(a.requestor.address) == peer:
                count += 1
        return count

    def _on_requested(self, event: evt.Event) -> None:
        """A-ASSOCIATE-RQ received: the connection stops being pending; association limits apply."""
        assoc, s = event.assoc, self.settings
        if self.server is not None and assoc.dul.socket is not None:
            self.server.requested(assoc.dul.socket.socket)
        assoc.acse_timeout = s.acse_timeout_s
        calling_ae = str(assoc.requestor.primitive.calling_ae_title or "").strip()
        peer = str(assoc.requestor.address)
        allowed = s.allowed_calling_ae_list
        if allowed and calling_ae not in allowed:
            log.warning(
                "association from an unknown calling AE: refused", extra={"calling_ae": calling_ae, "peer": peer}
            )
        elif not allowed and calling_ae not in self._seen_calling_aes and len(self._seen_calling_aes) < 1000:
            self._seen_calling_aes.add(calling_ae)
            log.warning(
                "association from a calling AE not in PT_INGEST_ALLOWED_CALLING_AES (empty: any AE may store)",
                extra={"calling_ae": calling_ae, "peer": peer},
            )
        with self._evict_lock:  # one request at a time decides who gives way
            reason = ""
            if self._negotiated(assoc) >= s.max_associations and not self._evict_for(assoc, None):
                reason = "max_associations"
            elif self._negotiated(assoc, peer) >= s.max_associations_per_peer and not self._evict_for(assoc, peer):
                reason = "max_associations_per_peer"
            if not reason:
                assoc._pt_requested = True
        if reason:
            ASSOCIATION_EVENTS.labels("rejected").inc()
            log.warning("association rejected: limit reached", extra={"reason_code": reason, "peer": peer})
            assoc.acse.send_reject(0x02, 0x03, 0x02)  # rejected-transient, local limit exceeded
            assoc.kill()

    def _evict_for(self, newcomer: Any, peer: str | None) -> bool:
        """At the association limit: close the association (of `peer`, or any) that has been stalled
        in the middle of a PDU for PT_INGEST_STALL_EVICT_S, else the one idle between messages for
        PT_INGEST_IDLE_EVICT_S the longest, so a modality is not locked out by sockets that do
        nothing. One whose request we are handling never gives way. True when one was closed."""
        s, now = self.settings, time.monotonic()
        stalled: list[tuple[float, Any]] = []
        idle: list[tuple[float, Any]] = []
        for a in self.ae.active_associations:
            if a is newcomer or not a.is_acceptor or not getattr(a, "_pt_requested", False):
                continue
            if getattr(a, "_pt_evicted", False) or a.is_released or a.is_aborted:
                continue
            if peer is not None and str(a.requestor.address) != peer:
                continue
            activity: Activity | None = getattr(a, "_pt_activity", None)
            if activity is None or activity.busy:
                continue
            if (stall := activity.stalled_for(now)) >= s.stall_evict_s:
                stalled.append((stall, a))
            elif (quiet := activity.idle_for(now)) >= s.idle_evict_s:
                idle.append((quiet, a))
        candidates = sorted(stalled, key=lambda t: -t[0]) or sorted(idle, key=lambda t: -t[0])
        if not candidates:
            return False
        seconds, victim = candidates[0]
        victim._pt_evicted = True
        ASSOCIATION_EVENTS.labels("evicted").inc()
        log.warning(
            "association closed to make room: "
            + ("stalled in the middle of a PDU" if stalled else "idle between messages"),
            extra={"peer": str(victim.requestor.address), "seconds": round(seconds, 1)},
        )
        sock = getattr(getattr(victim.dul, "socket", None), "socket", None)
        with contextlib.suppress(OSError, AttributeError):
            sock.shutdown(socket.SHUT_RDWR)  # its reader sees the end of the connection
        return True

    def _on_accepted(self, event: evt.Event) -> None:
        with self._locks_guard:
            self._open.add(id(event.assoc))
        ASSOCIATIONS.inc()
        ASSOCIATION_EVENTS.labels("accepted").inc()

    def _on_rejected(self, event: evt.Event) -> None:
        ASSOCIATION_EVENTS.labels("rejected").inc()
        log.warning("association rejected", extra={"calling_ae": event.assoc.requestor.ae_title})

    def _on_closed(self, event: evt.Event) -> None:
        with self._locks_guard:
            was_open = id(event.assoc) in self._open
            self._open.discard(id(event.assoc))
        if was_open:
            ASSOCIATIONS.dec()
        ASSOCIATION_EVENTS.labels(event.event.name.lower()).inc()

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    # --- C-STORE --------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _uid_lock(self, uid: str) -> Iterator[None]:
        """One C-STORE per SOP Instance UID at a time; the lock lives while anyone holds or awaits it."""
        with self._locks_guard:
            lock, users = self._locks.setdefault(uid, (threading.Lock(), [0]))
            users[0] += 1
        try:
            with lock:
                yield
        finally:
            with self._locks_guard:
                users[0] -= 1
                if users[0] == 0:
                    del self._locks[uid]

    def _uid_users(self, uid: str) -> int:
        """Holders + waiters of a UID's lock (for tests)."""
        with self._locks_guard:
            entry = self._locks.get(uid)
            return entry[1][0] if entry else 0

    def _on_loop(self, coro: Coroutine[Any, Any, T]) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout=self.settings.commit_timeout_s)
        except BaseException:
            future.cancel()
            raise

    def handle_store(self, event: evt.Event) -> Dataset:
        """EVT_C_STORE: a C-STORE request that came through pynetdicom's DIMSE layer, its data set in
        pynetdicom's temporary file (STORE_RECV_CHUNKED_DATASET), copied into a spool file here."""
        request = event.request
        sop_uid, sop_class = str(request.AffectedSOPInstanceUID or ""), str(request.AffectedSOPClassUID or "")
        STORE_PATHS.labels("dimse").inc()
        guard = LibraryGuard.of(event.assoc)
        if guard is not None and guard.violated is not None:  # aborted: nothing more from this peer is stored
            return status_dataset(CANNOT_PARSE, guard.violated.code)
        spool = self._spool_from(event)
        priority = int(getattr(request, "Priority", 0) or 0)
        return self._answer(event.assoc, sop_uid, sop_class, spool, str(event.context.abstract_syntax), priority)

    def _spool_from(self, event: evt.Event) -> Spool | None:
        """pynetdicom's file of the request's data set (preamble, File Meta, data set), as a spool."""
        try:
            source = Path(event.dataset_path)
        except AttributeError:
            return None
        if not source.is_file():
            return None
        request = event.request
        spool = Spool(
            self.spool_dir,
            str(request.AffectedSOPClassUID or ""),
            str(request.AffectedSOPInstanceUID or ""),
            str(event.context.transfer_syntax),
            header=False,
        )
        with source.open("rb") as f:
            while chunk := f.read(1 << 20):
                spool.write(chunk)
        spool.complete = True
        return spool

    def _on_wire_store(self, wire: Wire, request: StoreRequest) -> None:
        """A C-STORE request taken past pynetdicom's DIMSE layer (wire.py, on the DUL thread):
        answered as handle_store answers. The response holds what pynetdicom's Storage service
        class would put in it (message ID, SOP class and instance, status, error comment), encoded
        directly (the same bytes, tested) and sent on this thread; when the peer's PDUs are too
        small for it, pynetdicom builds, fragments and sends it."""
        assoc = wire.assoc
        STORE_PATHS.labels("wire").inc()
        status = self._answer(
            assoc,
            request.sop_instance_uid,
            request.sop_class_uid,
            request.spool,
            request.abstract_syntax,
            request.priority,
        )
        if not assoc.is_established:  # released or aborted meanwhile: nobody to answer
            return
        try:
            command = c_store_rsp_command(
                request.message_id,
                request.sop_class_uid,
                request.sop_instance_uid,
                int(status.Status),
                str(status.get("ErrorComment", "")),
            )
            if wire.send_command(request.context_id, command):
                return
            rsp = C_STORE()
            rsp.MessageID = request.message_id
            rsp.MessageIDBeingRespondedTo = request.message_id
            rsp.AffectedSOPClassUID = request.sop_class_uid
            rsp.AffectedSOPInstanceUID = request.sop_instance_uid
            rsp = StorageServiceClass(assoc).validate_status(status, rsp)
            assoc.dimse.send_msg(rsp, request.context_id)
        except Exception:  # the DUL thread must keep serving: the peer's DIMSE timeout tells it
            log.exception("cannot send the C-STORE response")

    def _answer(
        self, assoc: Any, sop_uid: str, sop_class: str, spool: Spool | None, context_class: str, priority: int = 0
    ) -> Dataset:
        """Store one request's data set and say how it went; `context_class` is the abstract syntax
        of the presentation context the request came on."""
        started = time.perf_counter()
        calling_ae = str(assoc.requestor.ae_title).strip()
        activity: Activity | None = getattr(assoc, "_pt_activity", None)
        if activity is not None:
            activity.busy += 1
        with bound_correlation_id(sop_uid or None):
            try:
                status = self._store(spool, sop_uid, sop_class, calling_ae, context_class, priority)
            except Exception:  # never let an exception reach pynetdicom: answer and keep serving
                log.exception("C-STORE failed unexpectedly")
                REJECTED.labels("internal_error").inc()
                status = status_dataset(OUT_OF_RESOURCES, "internal_error")
            finally:
                if spool is not None:
                    spool.discard()  # no-op once moved into the store
                if activity is not None:
                    activity.busy -= 1
                    activity.pdu_received()  # its idle time counts from the answer
            STORE_LATENCY.observe(time.perf_counter() - started)
            return status

    def _refuse(self, decision: Decision, calling_ae: str) -> Dataset:
        REJECTED.labels(decision.reason_code).inc()
        log.warning(
            "C-STORE refused",
            extra={"reason_code": decision.reason_code, "reason": decision.reason, "status": hex(decision.status)},
        )
        if decision.status != OUT_OF_RESOURCES:
            try:
                if self._on_loop(record_refusal(self.sessions, decision, calling_ae)) is not None:
                    self._committed()
            except Exception as exc:  # the refusal stands even when it cannot be recorded
                log.error("cannot record the refusal", extra={"error": repr(exc)})
        return status_dataset(decision.status, decision.reason_code)

    def _discard(self, decision: Decision, calling_ae: str) -> Dataset:
        """A well-formed non-image (SR, CT, PDF, ...) under PT_INGEST_OUT_OF_SCOPE=accept-and-discard:
        answered 0x0000 so that the sender's job goes on, nothing stored, counted, and recorded as
        discarded (the rejection row and event with the status answered, 0x0000). The spool file is
        removed by _answer. When the record cannot be written the instance is refused as usual
        (0x0122): nothing is acknowledged that is not accounted for."""
        refused_status = decision.status
        decision.status = SUCCESS
        decision.reason = f"discarded (PT_INGEST_OUT_OF_SCOPE=accept-and-discard): {decision.reason}"
        try:
            if self._on_loop(record_refusal(self.sessions, decision, calling_ae)) is not None:
                self._committed()
        except Exception as exc:
            log.error("cannot record the discard: refused instead", extra={"error": repr(exc)})
            decision.status = refused_status
            return self._refuse(decision, calling_ae)
        DISCARDED.labels(decision.reason_code).inc()
        log.info(
            "C-STORE discarded: out of scope",
            extra={"reason_code": decision.reason_code, "reason": decision.reason, "sop_class": decision.sop_class_uid},
        )
        return status_dataset(SUCCESS)

    def _committed(self) -> None:
        if self.on_commit is not None:
            self.loop.call_soon_threadsafe(self.on_commit)

    def _store(
        self, spool: Spool | None, sop_uid: str, sop_class: str, calling_ae: str, context_class: str, priority: int = 0
    ) -> Dataset:
        if spool is None:
            decision = Decision(Action.REFUSE, CANNOT_PARSE, "cannot_parse", "no data set was received")
            decision.sop_instance_uid, decision.sop_class_uid = sop_uid, sop_class
            return self._refuse(decision, calling_ae)
        if spool.error is not None:
            return self._unavailable("store_unavailable", OSError(spool.error))
        if context_class and sop_class != context_class:
            decision = Decision(
                Action.REFUSE,
                DATASET_MISMATCH,
                "sop_class_mismatch",
                "the C-STORE request's SOP class differs from its presentation context's",
            )
            decision.sop_instance_uid, decision.sop_class_uid = sop_uid, sop_class
            return self._refuse(decision, calling_ae)
        with self._uid_lock(sop_uid):
            # No separate "already stored?" query: a duplicate is validated and hashed like any
            # instance, its identical file already exists (spool dropped), and the commit step
            # finds the SOP instance and emits nothing (or, with other content, refuses it).
            decision = decide(spool.path, self.settings, sop_class, sop_uid)
            if decision.action is Action.REFUSE:
                if decision.reason_code == OUT_OF_SCOPE_CODE and self.settings.out_of_scope == "accept-and-discard":
                    return self._discard(decision, calling_ae)
                return self._refuse(decision, calling_ae)
            try:
                stored = self.store.put_spool(spool)
            except StoreError as exc:
                return self._unavailable("store_unavailable", exc)
            acquired, source = acquired_at(decision.dates)
            decision.lane, decision.lane_reason = classify(self.settings, calling_ae, priority, acquired, source)
            LANES.labels(decision.lane).inc()
            return self._commit(decision, stored, calling_ae)

    def _commit(self, decision: Decision, stored: StoredFile, calling_ae: str) -> Dataset:
        try:
            future = self.committer.submit(decision, stored, calling_ae)
            try:
                received = future.result(timeout=self.settings.commit_timeout_s)
            except BaseException:
                future.cancel()  # still queued: it is dropped; already committing: it may land
                raise
        except Exception as exc:
            # The file stays: it is complete and content-addressed, and a commit that timed out
            # here may still land; the sender retries (0xA700) and then finds it stored.
            return self._unavailable("db_unavailable", exc)
        if received is None:
            RECEIVED.labels("duplicate").inc()
            return status_dataset(SUCCESS)
        if isinstance(received, Conflict):
            return self._conflict(decision, stored, calling_ae)
        self._committed()
        BYTES.inc(stored.size)
        outcome = "accepted" if decision.triage_eligible else "stored_not_triaged"
        RECEIVED.labels(outcome).inc()
        log.info(
            "C-STORE stored",
            extra={
                "outcome": outcome,
                "sha256": stored.sha256,
                "bytes": stored.size,
                "not_triaged": decision.not_triaged_codes,
                "outside_intended_use": decision.outside_intended_use,
            },
        )
        return status_dataset(SUCCESS)

    def _conflict(self, decision: Decision, stored: StoredFile, calling_ae: str) -> Dataset:
        """The SOP Instance UID is stored already with other bytes: the first instance stays (it is
        what was judged and flagged), this one is refused with 0x0111 and its file removed from the
        store (its content includes its UID, so no other instance can name that file)."""
        if stored.created:
            with contextlib.suppress(OSError):
                stored.path.unlink()
        refusal = Decision(
            Action.REFUSE,
            DUPLICATE_SOP_INSTANCE,
            "duplicate_uid_different_content",
            "this SOP Instance UID is stored already with other content; the stored instance is kept",
        )
        refusal.sop_instance_uid, refusal.sop_class_uid = decision.sop_instance_uid, decision.sop_class_uid
        refusal.study_instance_uid = decision.study_instance_uid
        refusal.series_instance_uid = decision.series_instance_uid
        return self._refuse(refusal, calling_ae)

    def _unavailable(self, code: str, exc: Exception) -> Dataset:
        REJECTED.labels(code).inc()
        log.error("C-STORE refused: out of resources", extra={"reason_code": code, "error": repr(exc)[:500]})
        return status_dataset(OUT_OF_RESOURCES, code)
