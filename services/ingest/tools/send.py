"""`pneumotriage send`: C-STORE files or folders to an SCP — a thin wrapper over pynetdicom's SCU.

Each file is sent as it is on disk (pynetdicom streams the encoded data set: nothing is parsed or
re-encoded, so broken files reach the peer as they are),
so the association proposes exactly the files' own (SOP class, transfer syntax) pairs. More than 128
distinct pairs are split over several associations.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pynetdicom import AE, _config
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


def is_dicom_file(path: Path) -> bool:
    """A DICOM file with the file meta `send` needs (SOP class, transfer syntax, instance UID)."""
    return _pair(path) is not None


def _pair(path: Path) -> tuple[str, str] | None:
    """(SOP class, transfer syntax) from the file meta only: the data set itself is not parsed."""
    try:
        meta = read_file_meta_info(path)
        sop_class = str(meta.get("MediaStorageSOPClassUID") or "")
        ts = str(meta.get("TransferSyntaxUID") or "")
        has_uid = bool(meta.get("MediaStorageSOPInstanceUID"))
    except (InvalidDicomError, OSError, AttributeError, ValueError, EOFError, KeyError, TypeError):
        return None
    return (sop_class, ts) if sop_class and ts and has_uid else None


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

    # stream each file's encoded data set as it is on disk (no decode / re-encode on our side);
    # a pynetdicom global, restored afterwards for other users in the same process
    chunked = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        _send_batches(batches, host, port, called_ae, calling_ae, timeout, done)
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = chunked
    return summary


def _send_batches(
    batches: list[list[tuple[Path, tuple[str, str]]]],
    host: str,
    port: int,
    called_ae: str,
    calling_ae: str,
    timeout: float,
    done: Callable[[SendResult], None],
) -> None:
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
                except (ValueError, AttributeError) as exc:  # no accepted context / incomplete file meta
                    done(SendResult(path, None, str(exc)[:200]))
                    continue
                if status is None or "Status" not in status:
                    done(SendResult(path, None, "no response (timeout or abort)"))
                else:
                    done(SendResult(path, int(status.Status), str(status.get("ErrorComment", "") or "")))
        finally:
            if assoc.is_established:
                assoc.release()
