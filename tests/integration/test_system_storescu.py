"""The harness's notion of "C-STORE acknowledged" is read from real dcmtk storescu output against
a real dcmtk storescp (accepting, and refusing associations)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from harness.dicom_peers import StoreSCP
from harness.system_dicom import make_study_set
from harness.system_harness import STORESCU, parse_storescu_log


@pytest.mark.parametrize("refuse", [False, True])
def test_parse_real_storescu_output(tmp_path: Path, shared_data: Path, refuse: bool) -> None:
    made = make_study_set(shared_data, tmp_path / "dcm", 5)
    scp = StoreSCP(base_dir=tmp_path / "scp", extra_args=["--refuse"] if refuse else []).start()
    try:
        res = subprocess.run(
            [STORESCU, "-v", "-xy", "127.0.0.1", str(scp.port), *(str(m.path) for m in made)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        received = scp.received()
    finally:
        scp.stop()
    parsed = parse_storescu_log(res.stdout + res.stderr)
    if refuse:
        assert parsed.acked == []
        assert res.returncode != 0
    else:
        assert sorted(parsed.acked) == sorted(m.path for m in made)
        assert parsed.refused == []
        assert len(received) == 5
