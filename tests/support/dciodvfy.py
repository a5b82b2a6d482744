"""dciodvfy (Debian package dicom3tools, installed by `./pt test`): David Clunie's validator of a
DICOM object against its IOD. `errors(path)` lists its "Error" lines (warnings are not counted)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path


def dciodvfy_binary() -> str:
    found = shutil.which("dciodvfy")
    assert found, "dciodvfy is required (Debian package dicom3tools; ./pt test installs it)"
    return found


def report(path: Path | str) -> str:
    """dciodvfy's whole report (it writes it to stderr)."""
    res = subprocess.run([dciodvfy_binary(), str(path)], capture_output=True, text=True, timeout=120)
    return res.stdout + res.stderr


def errors(path: Path | str) -> list[str]:
    return [line for line in report(path).splitlines() if line.startswith("Error")]
