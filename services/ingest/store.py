"""The image store: DICOM files addressed by the sha256 of their bytes, written atomically.

<root>/ab/cd/abcd....dcm — a write goes to a temporary file in the target directory, is fsynced,
renamed over the final name and the directory is fsynced, so after a crash a name either holds the
complete file or does not exist. A failed write leaves nothing behind. Instances received over
DICOM arrive as spool files in <root>/.incoming (written while the data set streams in, see
wire.py) and are moved in the same way (put_spool: fsync, rename, fsync the directory; no copy).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


class Spooled(Protocol):
    """A complete file written elsewhere on the store's filesystem (wire.Spool)."""

    path: Path
    size: int

    @property
    def sha256(self) -> str: ...

    def sync_and_close(self) -> None: ...

    def discard(self) -> None: ...


class StoreError(OSError):
    """The store cannot take the file (disk full, read-only, not a directory, ...)."""


@dataclass(frozen=True)
class StoredFile:
    sha256: str
    path: Path
    size: int
    created: bool  # False when identical content was already there

    @property
    def uri(self) -> str:
        # the store's paths are absolute and canonical already (ContentStore resolves its root once):
        # resolving again would lstat every path component, twice per image
        return (self.path if self.path.is_absolute() else self.path.resolve()).as_uri()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ContentStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:4] / f"{sha256}.dcm"

    def check(self) -> bool:
        """True when the store root is a writable directory (for /healthz)."""
        return self.root.is_dir() and os.access(self.root, os.W_OK | os.X_OK)

    def _make_dirs(self, directory: Path, sync: bool = True) -> list[Path]:
        """Create `directory` and missing parents; fsync each new entry's parent now, or (sync=False)
        return those parents, deepest first, for the caller to fsync before it relies on them."""
        missing = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                d.mkdir()
            if sync:
                _fsync_dir(d.parent)
        return [] if sync else [d.parent for d in missing]

    def put(self, data: bytes) -> StoredFile:
        sha = hashlib.sha256(data).hexdigest()
        final = self.path_for(sha)
        try:
            if final.is_file() and final.stat().st_size == len(data):
                return StoredFile(sha, final, len(data), created=False)
            self._make_dirs(final.parent)
            tmp = final.parent / f".tmp-{uuid.uuid4().hex}"
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
                try:
                    view = memoryview(data)
                    while view:
                        written = os.write(fd, view)
                        view = view[written:]
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, final)
            except BaseException:
                with contextlib.suppress(OSError):
                    tmp.unlink()
                raise
            _fsync_dir(final.parent)
        except OSError as exc:
            raise StoreError(exc.errno, f"cannot write to the image store: {exc.strerror or exc}") from exc
        return StoredFile(sha, final, len(data), created=True)

    def put_spool(self, spool: Spooled) -> StoredFile:
        """Move a complete spooled file into the store (no copy); durable when this returns.

        Rename first, then fsync the file, then its directory (and any new ones): on ext4 and xfs the
        file's fsync commits the journal transaction that already holds the rename, so the directory
        fsyncs find little left to do: one journal commit per image instead of two when fsync came
        first (measured: docs/performance.md). Until those fsyncs return nothing is acknowledged, and
        a name left by a crash in between is verified (hash) before it is ever reused: see _have().
        The spool is consumed either way (moved, or discarded when identical content is there)."""
        sha, size = spool.sha256, spool.size
        final = self.path_for(sha)
        try:
            if self._have(final, sha, size):
                spool.discard()
                return StoredFile(sha, final, size, created=False)
            created_in = self._make_dirs(final.parent, sync=False)
            try:
                os.replace(spool.path, final)
            except BaseException:
                spool.discard()
                raise
            try:
                spool.sync_and_close()  # the same inode, now under its final name
            except BaseException:
                with contextlib.suppress(OSError):
                    final.unlink()
                raise
            for directory in [final.parent, *created_in]:
                _fsync_dir(directory)
        except OSError as exc:
            raise StoreError(exc.errno, f"cannot write to the image store: {exc.strerror or exc}") from exc
        return StoredFile(sha, final, size, created=True)

    @staticmethod
    def _have(final: Path, sha: str, size: int) -> bool:
        """True when `final` holds exactly this content, durably (read back, hashed and fsynced: it
        may be the name of a file another thread has not fsynced yet, or a crash's leftover)."""
        try:
            fd = os.open(final, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            if os.fstat(fd).st_size != size:
                return False
            digest = hashlib.sha256()
            while chunk := os.read(fd, 1 << 20):
                digest.update(chunk)
            if digest.hexdigest() != sha:
                return False
            os.fsync(fd)
            return True
        finally:
            os.close(fd)
