"""Spool files: one C-STORE request's data set received into a file (preamble + File Meta + data set),
hashed as it is written, then moved into the content-addressed store (store.py) or discarded.

A spool belongs to exactly one DIMSE message (messages.py creates it for a message and discards it
when that message ends any other way than being handed to the C-STORE handler)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import struct
import threading
import time
import uuid
from pathlib import Path

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION

log = logging.getLogger(__name__)

SPOOL_DIR = ".incoming"
STALE_SPOOL_S = 3600.0


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

    def __init__(
        self, directory: Path, sop_class_uid: str, sop_instance_uid: str, transfer_syntax: str, header: bool = True
    ) -> None:
        """`header=False`: the caller writes the preamble and File Meta itself (a copy of a Part 10 file)."""
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
        if header:
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
