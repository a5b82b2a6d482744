"""Unwritable store, full disk, locked database: 0xA700, nothing partial, no event — and recovery after."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest

from harness.rabbitmq import RabbitNode
from services.ingest.app import IngestService
from services.ingest.tools.make_dicom import make_dicom_file
from services.ingest.tools.send import send_files
from tests.support.ingest_service import AE_TITLE, call, drain, ingest_settings


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


@pytest.fixture
def tiny_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (we run as root in CI); skipped where mounting is not allowed."""
    mount_point = tmp_path / "tiny-store"
    mount_point.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point)], capture_output=True)
    if res.returncode != 0:
        # optional: a container without CAP_SYS_ADMIN cannot mount; nothing in the repository is missing
        pytest.skip(f"optional: cannot mount a tmpfs here (needs root/CAP_SYS_ADMIN): {res.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


async def test_disk_full_answers_a700_and_leaves_nothing(
    tiny_tmpfs: Path, tmp_path: Path, rabbit: RabbitNode, broker: object, shared_data: Path
) -> None:
    service = await IngestService(ingest_settings(tmp_path, rabbit.url, store_dir=tiny_tmpfs)).start(http=False)
    try:
        image = sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[10]
        big = make_dicom_file(image, tmp_path / "in", bits=16, size=1024)  # 2 MiB > 1 MiB store
        small = make_dicom_file(image, tmp_path / "in", transfer_syntax="jpeg-baseline")
        assert big.stat().st_size > 1024 * 1024

        summary = await call(send_files, [big], "127.0.0.1", service.dicom_port, AE_TITLE)
        assert summary.results[0].status == 0xA700
        assert summary.results[0].comment == "store_unavailable"
        assert _files_under(tiny_tmpfs) == []  # no partial file, no temp file
        assert await service.relay.backlog() == 0

        # the SCP keeps serving: an image that fits is stored
        ok = await call(send_files, [small], "127.0.0.1", service.dicom_port, AE_TITLE)
        assert ok.results[0].status == 0
        events = await drain(rabbit.url, "inference.images", expected=1)
        uid = pydicom.dcmread(small, stop_before_pixels=True).SOPInstanceUID
        assert [p.image.sop_instance_uid for _, p in events] == [uid]
    finally:
        await service.stop()


async def test_store_path_not_a_directory_answers_a700_then_recovers(
    tmp_path: Path, rabbit: RabbitNode, broker: object, shared_data: Path
) -> None:
    # chmod does not stop root: make the store root a plain file instead
    store = tmp_path / "store"
    service = await IngestService(ingest_settings(tmp_path, rabbit.url, store_dir=store)).start(http=False)
    try:
        image = sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[11]
        f = make_dicom_file(image, tmp_path / "in")
        shutil.rmtree(store)
        store.write_bytes(b"not a directory")
        health = await service.health()
        assert health["store"]["ok"] is False

        summary = await call(send_files, [f], "127.0.0.1", service.dicom_port, AE_TITLE)
        assert (summary.results[0].status, summary.results[0].comment) == (0xA700, "store_unavailable")
        assert await service.relay.backlog() == 0

        store.unlink()
        store.mkdir()
        retry = await call(send_files, [f], "127.0.0.1", service.dicom_port, AE_TITLE)
        assert retry.results[0].status == 0
        events = await drain(rabbit.url, "inference.images", expected=1)
        assert len(events) == 1
        assert len(_files_under(store)) == 1
    finally:
        await service.stop()


async def test_database_locked_answers_a700_never_success(
    tmp_path: Path, rabbit: RabbitNode, broker: object, shared_data: Path
) -> None:
    settings = ingest_settings(tmp_path, rabbit.url, commit_timeout_s=3.0)
    service = await IngestService(settings).start(http=False)
    image = sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[12]
    f = make_dicom_file(image, tmp_path / "in")
    db_path = settings.data_dir / "ingest.db"
    # another writer holds the database: our transaction cannot commit in time
    blocker = sqlite3.connect(db_path, timeout=1, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        summary = await call(send_files, [f], "127.0.0.1", service.dicom_port, AE_TITLE)
        assert (summary.results[0].status, summary.results[0].comment) == (0xA700, "db_unavailable")
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    try:
        # the sender retries once the database is back: stored, exactly one event
        retry = await call(send_files, [f], "127.0.0.1", service.dicom_port, AE_TITLE)
        assert retry.results[0].status == 0
        events = await drain(rabbit.url, "inference.images", expected=1, settle=2.0)
        assert [p.image.sop_instance_uid for _, p in events] == [pydicom.dcmread(f).SOPInstanceUID]
    finally:
        await service.stop()
