"""The harness's notion of "C-STORE acknowledged" is read from real dcmtk storescu output against
a real dcmtk storescp (accepting, and refusing associations)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from services.core.net import free_port
from tests.support.system_dicom import make_study_set
from tests.support.system_harness import STORESCU, parse_storescu_log


def _storescp(tmp_path: Path, *extra: str) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    out = tmp_path / "scp"
    out.mkdir(exist_ok=True)
    proc = subprocess.Popen(["/usr/bin/storescp", "+xa", *extra, "-od", str(out), str(port)])
    time.sleep(0.5)
    return proc, port


@pytest.mark.parametrize("refuse", [False, True])
def test_parse_real_storescu_output(tmp_path: Path, shared_data: Path, refuse: bool) -> None:
    made = make_study_set(shared_data, tmp_path / "dcm", 5)
    proc, port = _storescp(tmp_path, *(["--refuse"] if refuse else []))
    try:
        res = subprocess.run(
            [STORESCU, "-v", "-xy", "127.0.0.1", str(port), *(str(m.path) for m in made)],
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        proc.terminate()
        proc.wait(10)
    parsed = parse_storescu_log(res.stdout + res.stderr)
    if refuse:
        assert parsed.acked == []
        assert res.returncode != 0
    else:
        assert sorted(parsed.acked) == sorted(m.path for m in made)
        assert parsed.refused == []
        assert len(list((tmp_path / "scp").iterdir())) == 5
