"""`pneumotriage send`: C-STORE files or folders to an SCP — a thin wrapper over pynetdicom's SCU.

Each file is sent as it is on disk (pynetdicom streams the encoded data set: nothing is re-encoded),
so the association proposes exactly the files' own (SOP class, transfer syntax) pairs. More than 128
distinct pairs are split over several associations.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError
from pynetdicom import AE
from pynetdicom.presentation import build_context

log = logging.getLogger(__name__)
MAX_CONTEXTS = 128


@dataclass
class SendResult:
    path: Path
    status: int | None  # None: not sent (unreadable file, no association, no accepted context)
    comment: str = ""

    @property
    def ok(self) -> bool:
        return self.status is not None and (self.status == 0 or (self.status & 0xF000) == 0xB000)


@dataclass
class SendSummary:
    results: list[SendResult] = field(default_factory=list)

    @property
    def failed(self) -> list[SendResult]:
        return [r for r in self.results if not r.ok]

    def by_status(self) -> Counter[str]:
        return Counter("not sent" if r.status is None else f"0x{r.status:04X}" for r in self.results)


def collect_files(paths: Iterable[Path | str]) -> list[Path]:
    """Files as given, and every file under given folders (sorted, hidden files skipped)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.is_file() and not f.name.startswith("."))
        else:
            out.append(p)
    return out


def _pair(path: Path) -> tuple[str, str] | None:
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
        sop_class = str(ds.get("SOPClassUID") or ds.file_meta.get("MediaStorageSOPClassUID") or "")
        ts = str(ds.file_meta.get("TransferSyntaxUID") or "")
    except (InvalidDicomError, OSError, AttributeError, ValueError, EOFError, KeyError, TypeError):
        return None
    return (sop_class, ts) if sop_class and ts else None


def send_files(
    files: list[Path],
    host: str,
    port: int,
    called_ae: str = "PNEUMOTRIAGE",
    calling_ae: str = "PT_SEND",
    on_result: Callable[[SendResult], None] | None = None,
    timeout: float = 60.0,
) -> SendSummary:
    summary = SendSummary()

    def done(result: SendResult) -> None:
        summary.results.append(result)
        if on_result is not None:
            on_result(result)

    readable: list[tuple[Path, tuple[str, str]]] = []
    for f in files:
        pair = _pair(f)
        if pair is None:
            done(SendResult(f, None, "not a readable DICOM file"))
        else:
            readable.append((f, pair))

    # group files into batches of at most MAX_CONTEXTS distinct (SOP class, transfer syntax) pairs
    batches: list[list[tuple[Path, tuple[str, str]]]] = []
    pairs: set[tuple[str, str]] = set()
    for item in readable:
        if not batches or (item[1] not in pairs and len(pairs) >= MAX_CONTEXTS):
            batches.append([])
            pairs = set()
        pairs.add(item[1])
        batches[-1].append(item)

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for batch in batches:
        contexts = [build_context(sop, [ts]) for sop, ts in sorted({p for _, p in batch})]
        assoc = ae.associate(host, port, contexts=contexts, ae_title=called_ae)
        if not assoc.is_established:
            for path, _ in batch:
                done(SendResult(path, None, "association rejected or aborted"))
            continue
        try:
            for path, _ in batch:
                if not assoc.is_established:
                    done(SendResult(path, None, "association lost"))
                    continue
                try:
                    status = assoc.send_c_store(path)
                except ValueError as exc:  # no accepted presentation context for this file
                    done(SendResult(path, None, str(exc)[:200]))
                    continue
                if status is None or "Status" not in status:
                    done(SendResult(path, None, "no response (timeout or abort)"))
                else:
                    done(SendResult(path, int(status.Status), str(status.get("ErrorComment", "") or "")))
        finally:
            if assoc.is_established:
                assoc.release()
    return summary
