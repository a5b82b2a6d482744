"""The image store: DICOM files addressed by the sha256 of their bytes, written atomically.

<root>/ab/cd/abcd....dcm — a write goes to a temporary file in the target directory, is fsynced,
renamed over the final name and the directory is fsynced, so after a crash a name either holds the
complete file or does not exist. A failed write leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path


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
        return self.path.resolve().as_uri()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ContentStore:
    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path_for(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256[2:4] / f"{sha256}.dcm"

    def check(self) -> bool:
        """True when the store root is a writable directory (for /healthz)."""
        return self.root.is_dir() and os.access(self.root, os.W_OK | os.X_OK)

    def _make_dirs(self, directory: Path) -> None:
        missing = []
        d = directory
        while not d.exists():
            missing.append(d)
            d = d.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                d.mkdir()
            _fsync_dir(d.parent)

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
