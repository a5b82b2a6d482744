"""Storage Commitment Push Model SCP (PS3.4 Annex J): N-ACTION in, N-EVENT-REPORT out.

A sender asks, after its C-STOREs, whether we have taken responsibility for a list of instances
(N-ACTION, action type 1, a Transaction UID and the Referenced SOP Sequence). We answer the
N-ACTION at once (0x0000: request taken) and then report, in one N-EVENT-REPORT: an instance is
committed (Referenced SOP Sequence) only when its row is in the ingest database **and** its file is
in the image store with the size recorded; every other one is listed in the Failed SOP Sequence
with Failure Reason 0x0112 (no such object instance) or 0x0119 (class-instance conflict: stored
under another SOP class). Nothing is committed that a C-STORE did not acknowledge.

Where the report goes (PS3.4 J.3.3): to the address configured for the requestor's AE title in
PT_INGEST_COMMITMENT_PEERS (`AE=host:port`, comma-separated) on a new association on which we
propose the Storage Commitment Push Model with the SCP role (SCP/SCU role selection): what
Orthanc, dcmtk and most PACS expect. A requestor not listed gets the report on its own association
if it keeps it open; otherwise the report is not sent (logged), the requestor's commitment times
out, and the images stay stored.

N-ACTION goes through pynetdicom's own DIMSE path (the fast path takes only C-STORE requests).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from services.ingest.models import Instance

log = logging.getLogger("services.ingest.commitment")

STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # the well-known SOP instance
NO_SUCH_INSTANCE = 0x0112
CLASS_INSTANCE_CONFLICT = 0x0119


def parse_peers(value: str) -> dict[str, tuple[str, int]]:
    """ "AE=host:port,AE2=host:port" -> {AE: (host, port)}."""
    peers: dict[str, tuple[str, int]] = {}
    for part in (p.strip() for p in value.split(",")):
        if not part:
            continue
        try:
            ae, address = part.split("=", 1)
            host, port = address.rsplit(":", 1)
            peers[ae.strip()] = (host.strip(), int(port))
        except ValueError as exc:
            raise ValueError(f"PT_INGEST_COMMITMENT_PEERS: {part!r} is not AE=host:port") from exc
    return peers


def _on_disk(uri: str, size: int) -> bool:
    path = Path(unquote(urlparse(uri).path))
    try:
        return os.stat(path).st_size == size
    except OSError:
        return False


class StorageCommitmentSCP:
    def __init__(
        self,
        ae_title: str,
        peers: dict[str, tuple[str, int]],
        sessions: async_sessionmaker[AsyncSession],
        on_loop: Callable[[Coroutine[Any, Any, Any]], Any],
        timeout_s: float = 30.0,
    ) -> None:
        self.ae_title = ae_title
        self.peers = peers
        self.sessions = sessions
        self.on_loop = on_loop
        self.timeout_s = timeout_s

    async def _rows(self, uids: list[str]) -> dict[str, Instance]:
        async with self.sessions() as session:
            rows = (await session.scalars(select(Instance).where(Instance.sop_instance_uid.in_(uids)))).all()
        return {r.sop_instance_uid: r for r in rows}

    def report_for(self, info: Dataset) -> tuple[Dataset, int, int]:
        """The N-EVENT-REPORT data set for an N-ACTION's information: (data set, committed, failed)."""
        refs = [
            (str(getattr(i, "ReferencedSOPClassUID", "") or ""), str(getattr(i, "ReferencedSOPInstanceUID", "") or ""))
            for i in info.get("ReferencedSOPSequence", [])
        ]
        rows = self.on_loop(self._rows([uid for _, uid in refs if uid]))
        ok, failed = DicomSequence(), DicomSequence()
        for sop_class, uid in refs:
            item = Dataset()
            item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = sop_class, uid
            row = rows.get(uid)
            if row is not None and row.sop_class_uid == sop_class and _on_disk(row.storage_uri, row.size_bytes):
                ok.append(item)
                continue
            item.FailureReason = (
                CLASS_INSTANCE_CONFLICT if row is not None and row.sop_class_uid != sop_class else NO_SUCH_INSTANCE
            )
            failed.append(item)
        report = Dataset()
        report.TransactionUID = info.TransactionUID
        if ok:
            report.ReferencedSOPSequence = ok
        if failed:
            report.FailedSOPSequence = failed
        return report, len(ok), len(failed)

    def handle_n_action(self, event: Any) -> tuple[int, Dataset | None]:
        """EVT_N_ACTION: check the request, answer it, report from another thread once answered."""
        request = event.request
        if str(request.RequestedSOPClassUID) != STORAGE_COMMITMENT_PUSH:
            return 0x0118, None  # no such SOP class
        if int(request.ActionTypeID) != 1:
            return 0x0123, None  # no such action
        try:
            info = event.action_information
        except Exception:
            return 0x0115, None  # invalid argument value
        if not getattr(info, "TransactionUID", None) or "ReferencedSOPSequence" not in info:
            return 0x0115, None
        calling_ae = str(event.assoc.requestor.ae_title).strip()
        report, n_ok, n_failed = self.report_for(info)
        log.info(
            "storage commitment requested",
            extra={"calling_ae": calling_ae, "committed": n_ok, "failed": n_failed},
        )
        threading.Thread(
            target=self._deliver, args=(event.assoc, calling_ae, report, n_failed), daemon=True, name="pt-commitment"
        ).start()
        return 0x0000, None

    def _deliver(self, assoc: Any, calling_ae: str, report: Dataset, n_failed: int) -> None:
        event_type = 2 if n_failed else 1  # 1: all committed; 2: failures exist
        try:
            if calling_ae in self.peers:
                self._report_on_new_association(calling_ae, report, event_type)
                return
            time.sleep(0.2)  # our N-ACTION response goes out first
            if assoc.is_established:
                status = assoc.send_n_event_report(
                    report, event_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
                )[0]
                log.info(
                    "storage commitment reported on the requestor's association",
                    extra={"calling_ae": calling_ae, "status": int(getattr(status, "Status", -1))},
                )
                return
            log.warning(
                "storage commitment not reported: the requestor closed its association and has no "
                "address in PT_INGEST_COMMITMENT_PEERS",
                extra={"calling_ae": calling_ae},
            )
        except Exception as exc:
            log.warning("storage commitment report failed", extra={"calling_ae": calling_ae, "error": repr(exc)})

    def _report_on_new_association(self, calling_ae: str, report: Dataset, event_type: int) -> None:
        from pynetdicom import AE, build_role

        host, port = self.peers[calling_ae]
        ae = AE(ae_title=self.ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout_s
        ae.connection_timeout = self.timeout_s
        ae.add_requested_context(STORAGE_COMMITMENT_PUSH)
        role = build_role(STORAGE_COMMITMENT_PUSH, scu_role=False, scp_role=True)
        assoc = ae.associate(host, port, ae_title=calling_ae, ext_neg=[role])
        if not assoc.is_established:
            log.warning(
                "storage commitment not reported: association refused",
                extra={"calling_ae": calling_ae, "address": f"{host}:{port}"},
            )
            return
        try:
            status = assoc.send_n_event_report(
                report, event_type, STORAGE_COMMITMENT_PUSH, STORAGE_COMMITMENT_INSTANCE
            )[0]
        finally:
            assoc.release()
        log.info(
            "storage commitment reported",
            extra={"calling_ae": calling_ae, "address": f"{host}:{port}", "status": int(getattr(status, "Status", -1))},
        )
