"""Ingest's /healthz tells the truth about the image store (issue 22, item 10): on a real filesystem
that fills up (a small tmpfs), the store is degraded (503, with the reason) when free space falls
under the floor and when nothing more can be written, and healthy again once space is freed."""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from harness.rabbitmq import RabbitNode
from harness.wait import eventually_async
from services.ingest.app import STORE_MIN_FREE_BYTES, IngestService
from tests.support.ingest_service import ingest_settings

MIB = 1024 * 1024


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A tmpfs a little larger than the free-space floor (we run as root in CI)."""
    mount_point = tmp_path / "small-store"
    mount_point.mkdir()
    size_mib = STORE_MIN_FREE_BYTES // MIB + 16
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(mount_point)], capture_output=True
    )
    if res.returncode != 0:
        # optional: a container without CAP_SYS_ADMIN cannot mount; nothing in the repository is missing
        pytest.skip(f"optional: cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {res.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(path: Path, leave_bytes: int = 0) -> None:
    """Write zeros to `path` until the filesystem has about `leave_bytes` free, or is full (ENOSPC)."""
    chunk = b"\0" * MIB
    with open(path, "ab") as fh:
        while True:
            st = os.statvfs(path.parent)
            free = st.f_bavail * st.f_frsize
            if leave_bytes and free <= leave_bytes:
                return
            try:
                fh.write(chunk[: max(4096, min(len(chunk), free - leave_bytes))] if leave_bytes else chunk)
                fh.flush()
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
                return


async def healthz(service: IngestService) -> tuple[int, dict]:
    async with httpx.AsyncClient() as client:
        res = await client.get(f"http://127.0.0.1:{service.settings.http_port}/healthz", timeout=10)
    return res.status_code, res.json()["checks"]["store"]


async def test_healthz_reports_a_full_store(small_tmpfs: Path, tmp_path: Path, rabbit: RabbitNode) -> None:
    service = await IngestService(ingest_settings(tmp_path, rabbit.url, store_dir=small_tmpfs)).start()
    try:
        await eventually_async(lambda: healthz(service), 30, what="ingest's HTTP port", ignore=(httpx.ConnectError,))
        status, store = await healthz(service)
        assert status == 200 and store["ok"] is True, store
        assert store["free_bytes"] >= STORE_MIN_FREE_BYTES

        filler = small_tmpfs / "filler"
        fill(filler, leave_bytes=STORE_MIN_FREE_BYTES // 2)  # writable, but under the floor
        status, store = await healthz(service)
        assert status == 503 and store["ok"] is False, store
        assert "below" in store["reason"] and store["free_bytes"] < STORE_MIN_FREE_BYTES

        fill(filler)  # full: not one more page can be written
        status, store = await healthz(service)
        assert status == 503 and store["ok"] is False, store
        assert "No space left on device" in store["reason"], store
        assert not [n for n in os.listdir(small_tmpfs) if n.startswith(".healthz")]  # the probe left nothing

        filler.unlink()
        status, store = await healthz(service)
        assert status == 200 and store["ok"] is True, store
    finally:
        await service.stop()
