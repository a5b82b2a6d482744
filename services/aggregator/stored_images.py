"""The X-ray files ingest stored, found by their storage URI (``file://...``): path and header."""

from __future__ import annotations

import logging
from pathlib import Path
from urllib.parse import unquote, urlparse

from pydicom.dataset import Dataset

log = logging.getLogger(__name__)


def path_of(storage_uri: str) -> Path | None:
    if not storage_uri:
        return None
    parsed = urlparse(storage_uri)
    if parsed.scheme in ("", "file"):
        return Path(unquote(parsed.path))
    return None


def read_header(storage_uri: str) -> Dataset | None:
    """The stored image's header (no pixels), or None when it cannot be read."""
    from services.core.imaging import read_dicom

    path = path_of(storage_uri)
    if path is None or not path.is_file():
        return None
    try:
        return read_dicom(path, stop_before_pixels=True)
    except Exception:  # a missing or unreadable file must not break the result
        log.warning("cannot read stored header", extra={"error": "unreadable file"})
        return None
