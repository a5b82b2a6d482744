"""A real labeling service (subprocess `pneumotriage labeling`) on a free port with its own data dir,
users and gold, plus DICOMs carrying PHI marker strings and image.received events on the real broker."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import sqlite3
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from harness.processes import CLI, TestProcess
from harness.wait import eventually
from services.core.broker import Broker
from services.core.contracts import ImageReceived, ImageRef
from services.core.net import free_port

OWNER = ("owner1", "owner-pass-1")
ANNOTATOR = ("ann1", "ann-pass-1")
ANNOTATOR2 = ("ann2", "ann-pass-2")
# strings that must never appear in any page or API response
PHI_MARKERS = ("PHIMARK", "Sample^Patient", "KERMANY-", "19870704", "Fictional General")
TEST_JOB = """
name: pneumonia-cxr-test
version: "0.0.1-test"
title: "Pneumonia or healthy? (test job)"
purpose: "Test job. A diagnostic aid: no patient is diagnosed from your answer alone."
question: "Do the lungs in this chest X-ray look like pneumonia, or healthy?"
answers:
  - {value: pneumonia, label: "Pneumonia", key: "p", help: "opacity"}
  - {value: healthy, label: "Healthy", key: "h", help: "clear lungs"}
  - {value: cant_tell, label: "Can't tell", key: "c", help: "cannot judge"}
confidence:
  - {value: sure, label: "Sure", key: "1"}
  - {value: probably, label: "Probably", key: "2"}
cant_tell_reasons: ["poor image quality (blurred, too dark or too bright)", "not a chest X-ray"]
redundancy: {judgments_per_image: 3, max_judgments: 7, target_confidence: 0.95, em_min_judgments: 20}
gold: {hidden_ratio: %(ratio)s, examples_per_class: 2, quiz_length: 8, quiz_pass_mark: 0.75, quiz_attempts: 2,
       feedback_delay: 3, contested_min_trusted: 3, contested_share: 0.5}
trust: {prior_correct: 4, prior_wrong: 1, threshold: 0.7, min_gold: 3}
pay: {currency: USD, per_judgment: 0.04}
"""


def marked_dicom(src: Path, out: Path, index: int) -> str:
    """A DX chest DICOM of src's pixels whose PHI fields hold marker strings; returns its SOP uid."""
    arr = np.asarray(Image.open(src).convert("L"), dtype=np.uint8)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName = f"PHIMARK^Child{index}"
    ds.PatientID = f"PHIMARK-ID-{index}"
    ds.PatientBirthDate = "19870704"
    ds.AccessionNumber = f"PHIMARKACC{index}"
    ds.InstitutionName = "Fictional General PHIMARK"
    ds.ReferringPhysicianName = "PHIMARK^Doctor"
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "DX", "CHEST", "PA"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = arr.tobytes()
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return str(ds.SOPInstanceUID)


def image_received(path: Path, eligible: bool = True) -> ImageReceived:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ImageReceived(
        image=ImageRef(
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_instance_uid=str(ds.SOPInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            storage_uri=path.resolve().as_uri(),
            sha256="0" * 64,
        ),
        modality="DX",
        body_part_examined="CHEST",
        view_position="PA" if eligible else "LL",
        rows=int(ds.Rows),
        columns=int(ds.Columns),
        triage_eligible=eligible,
        not_triaged_reason="" if eligible else "view position LL is not triaged",
    )


def publish(amqp_url: str, events: list[ImageReceived], duplicate_first: bool = False) -> None:
    """Publish image.received events (confirmed) from a private event loop in a thread."""

    async def _go() -> None:
        broker = await Broker(amqp_url).connect()
        try:
            for ev in events + (events[:1] if duplicate_first else []):
                uid = ev.image.sop_instance_uid
                await broker.publish("image.received", ev, message_id=f"ingest:{uid}", correlation_id=uid)
        finally:
            await broker.close()

    errors: list[BaseException] = []

    def _thread() -> None:
        try:
            asyncio.run(_go())
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=_thread)
    t.start()
    t.join(120)
    if errors:
        raise errors[0]


def purge_labeling_queues(amqp_url: str) -> None:
    """Drop image.received events other tests left for the labeling queue on the shared broker node."""
    from services.core.broker import CONSUMERS

    spec = CONSUMERS["labeling"]

    async def _go() -> None:
        broker = await Broker(amqp_url).connect()
        try:
            assert broker.connection is not None
            channel = await broker.connection.channel()
            for name in (spec.queue, spec.dlq, *(spec.retry_queue(d) for d in spec.retry_delays_ms)):
                await (await channel.get_queue(name)).purge()
        finally:
            await broker.close()

    errors: list[BaseException] = []
    t = threading.Thread(target=lambda: _run_catching(_go, errors))
    t.start()
    t.join(60)
    if errors:
        raise errors[0]


def _run_catching(fn: Any, errors: list[BaseException]) -> None:
    try:
        asyncio.run(fn())
    except BaseException as exc:
        errors.append(exc)


class LabelingServer:
    def __init__(
        self,
        amqp_url: str,
        gold_data: Path,
        n_gold: int = 28,  # 4 examples, 16 quiz items (2 disjoint attempts), 8 hidden
        hidden_ratio: float = 0.2,
        database_url: str | None = None,
    ) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="pt-labeling-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.store = self.base / "store"
        job = self.base / "job.yaml"
        job.write_text(TEST_JOB % {"ratio": hidden_ratio})
        self.env = {
            **os.environ,
            "PT_DATA_DIR": str(self.base / "var"),
            "PT_AMQP_URL": amqp_url,
            "PT_LABELING_HTTP_PORT": str(self.port),
            "PT_SECRET_KEY": "test-secret-" + self.base.name,
            "PT_LABELING_UNDO_WINDOW_S": "2",
            "PT_LABELING_JOB_FILE": str(job),
            "PT_LOG_LEVEL": "INFO",
        }
        if database_url:
            self.env["PT_DATABASE_URL"] = database_url
        self.gold_data, self.n_gold = gold_data, n_gold
        self.proc = TestProcess(
            "labeling", [*CLI, "labeling"], self.base / "service.log", env=self.env, health_url=self.url + "/healthz"
        )
        self.db = self.base / "var" / "labeling.db"

    def cli(self, *args: str) -> str:
        res = subprocess.run(
            [*CLI, "labeling", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert res.returncode == 0, res.stderr[-3000:] + "\n--- service log ---\n" + self.log()
        return res.stdout

    def start(self) -> LabelingServer:
        """Create users and gold with the CLI, then launch the service and wait until it is healthy."""
        self.cli("add-user", OWNER[0], "--role", "owner", "--password", OWNER[1])
        for name, pw in (ANNOTATOR, ANNOTATOR2):
            self.cli("add-user", name, "--role", "annotator", "--password", pw)
        self.cli("import-gold", "--data", str(self.gold_data), "--n", str(self.n_gold))
        purge_labeling_queues(self.env["PT_AMQP_URL"])
        return self.launch()

    def kill9(self) -> None:
        self.proc.kill9()

    def launch(self) -> LabelingServer:
        self.proc.start()
        self.proc.wait_healthy(90)
        return self

    def log(self) -> str:
        return self.proc.tail(12000)

    def stop(self) -> None:
        self.proc.stop(30)
        shutil.rmtree(self.base, ignore_errors=True)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with sqlite3.connect(self.db, timeout=30) as con:
            return con.execute(sql, params).fetchall()

    def wait_for(self, sql: str, predicate: Any, timeout: float = 60.0, *params: Any) -> list[tuple[Any, ...]]:
        """The rows of `sql` once predicate(rows) holds (harness.wait.eventually)."""
        seen: list[list[tuple[Any, ...]]] = [[]]

        def rows_ok() -> tuple[list[tuple[Any, ...]]] | None:
            seen[0] = self.query(sql, *params)
            return (seen[0],) if predicate(seen[0]) else None  # (rows,): no rows can be the answer

        return eventually(rows_ok, timeout, 0.3, what=lambda: f"{sql!r}: last {seen[0]!r}\n{self.log()}")[0]

    def add_work_images(self, sources: list[Path], eligible: bool = True, duplicate_first: bool = False) -> list[str]:
        uids, events = [], []
        for i, src in enumerate(sources):
            out = self.store / f"{len(list(self.store.glob('*.dcm'))) + i:05d}.dcm"
            uids.append(marked_dicom(src, out, i))
            events.append(image_received(out, eligible))
        publish(self.env["PT_AMQP_URL"], events, duplicate_first)
        return uids


class Api:
    """A signed-in JSON API client."""

    def __init__(self, url: str, name: str, password: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=60, follow_redirects=True)
        token = self.client.get("/api/csrf").json()["csrf_token"]
        res = self.client.post("/api/login", json={"name": name, "password": password}, headers={"X-CSRF-Token": token})
        assert res.status_code == 200, res.text
        self.headers = {"X-CSRF-Token": res.json()["csrf_token"]}

    def get(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.get(path, **kw)

    def post(self, path: str, **kw: Any) -> httpx.Response:
        return self.client.post(path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def csrf_from_page(self, path: str) -> str:
        m = re.search(r'name="csrf_token" value="([^"]+)"', self.get(path, headers={"accept": "text/html"}).text)
        assert m
        return m.group(1)


def gold_answers(server: LabelingServer) -> dict[str, str]:
    return dict(server.query("SELECT id, gold_label FROM labeling_tasks WHERE gold_label IS NOT NULL"))


def work_sources(shared_data: Path, n: int, offset: int = 0) -> list[tuple[Path, str]]:
    """n training images (about half per class) taken from the end of the sorted folders (gold is drawn at random)."""
    out: list[tuple[Path, str]] = []
    for folder, label, k in (("NORMAL", "healthy", n // 2), ("PNEUMONIA", "pneumonia", n - n // 2)):
        files = sorted((shared_data / "kermany224" / "train" / folder).glob("*.jpeg"))
        out += [(f, label) for f in files[-(offset + k) : len(files) - offset]]
    return out


@pytest.fixture(scope="module", name="labeling_server")
def labeling_server_fixture(rabbit: Any, shared_data: Path) -> Iterator[LabelingServer]:
    server = LabelingServer(rabbit.url, shared_data / "kermany224" / "train").start()
    try:
        yield server
    finally:
        server.stop()
