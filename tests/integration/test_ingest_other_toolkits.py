"""Transfer syntaxes real PACS send, in files other toolkits wrote: JPEG-LS lossless and
near-lossless, JPEG Extended (12 bit) and the retired Explicit VR Big Endian, sent by dcmtk's
storescu to the real SCP, stored bit-exact, and decoded by inference's own decode path.

Two sources: pydicom's test files (written by CharLS, GDCM and others), and a chest X-ray from the
shared set re-encoded by dcmtk's dcmcjpls / dcmcjpeg / dcmconv (these are triaged end to end)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from harness.dicom_peers import STORESCU, storescu_flags_for
from harness.rabbitmq import RabbitNode
from services.core.imaging import display_array
from services.inference.preprocess import INPUT_SIZE
from services.inference.worker import load_image
from services.ingest.app import IngestService
from tests.support.ingest_service import AE_TITLE, drain, drain_lanes, ingest_service_fixture, run  # noqa: F401

JPEG_LS_LOSSLESS = "1.2.840.10008.1.2.4.80"
JPEG_LS_NEAR = "1.2.840.10008.1.2.4.81"
JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
BIG_ENDIAN = "1.2.840.10008.1.2.2"
STORESCU_BIG_ENDIAN = ("-xb",)  # propose explicit VR big endian first


async def store(port: int, path: Path, flags: tuple[str, ...]) -> None:
    res = await run([STORESCU, "-aet", "OTHERTK", "-aec", AE_TITLE, *flags, "127.0.0.1", str(port), str(path)])
    assert res.returncode == 0, f"{path.name}: {res.stderr}"


def stored_path(event: object) -> Path:
    return Path(urlparse(event.image.storage_uri).path)  # type: ignore[attr-defined]


def check_stored_and_decoded(event: object, source: Path, transfer_syntax: str) -> np.ndarray:
    """Stored bit-exact in the sender's syntax; inference's decode path turns it into a tensor.
    Returns the stored file's display image."""
    path = stored_path(event)
    assert event.image.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # type: ignore[attr-defined]
    kept, original = pydicom.dcmread(path), pydicom.dcmread(source)
    assert kept.file_meta.TransferSyntaxUID == transfer_syntax
    assert kept.PixelData == original.PixelData
    loaded = load_image(event.image.storage_uri, event.image.sha256, INPUT_SIZE)  # type: ignore[attr-defined]
    assert loaded.tensor.shape == (1, INPUT_SIZE, INPUT_SIZE) and np.all(np.isfinite(loaded.tensor))
    assert (loaded.rows, loaded.columns) == (original.Rows, original.Columns)
    return display_array(kept)


PYDICOM_FILES = {
    "JPEGLSNearLossless_08.dcm": JPEG_LS_NEAR,  # 8 bit
    "JPEGLSNearLossless_16.dcm": JPEG_LS_NEAR,  # 16 bit
    "JPGExtended.dcm": JPEG_EXTENDED,  # 12 bits stored
}


async def test_pydicom_test_files_jpeg_ls_and_jpeg_extended(
    ingest_service: IngestService, rabbit: RabbitNode, tmp_path: Path
) -> None:
    sources = {}
    for name, ts in PYDICOM_FILES.items():
        path = tmp_path / name
        shutil.copy(str(get_testdata_file(name)), path)
        if "StudyInstanceUID" not in pydicom.dcmread(path, stop_before_pixels=True):
            # pydicom's JPEG-LS samples carry no study/series (ingest refuses that): dcmtk adds them,
            # the pixel stream stays the one the other toolkit wrote
            res = await run(dcmtk("dcmodify", "-nb", "-gst", "-gse", str(path)))
            assert res.returncode == 0, res.stderr
        assert str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID) == ts
        original = pydicom.dcmread(str(get_testdata_file(name)))
        assert pydicom.dcmread(path).PixelData == original.PixelData
        await store(ingest_service.dicom_port, path, storescu_flags_for(path))
        sources[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = (path, ts)

    events = await drain_lanes(rabbit.url, "inference.images", expected=len(sources))
    assert sorted(e.image.sop_instance_uid for _, e in events) == sorted(sources)
    for _, event in events:
        path, ts = sources[event.image.sop_instance_uid]
        assert event.transfer_syntax_uid == ts
        shown = check_stored_and_decoded(event, path, ts)
        # the decode is the reference decoder's (pydicom + pylibjpeg-libjpeg) pixel for pixel
        assert np.array_equal(shown, display_array(pydicom.dcmread(path)))
        # secondary captures without a chest body part: stored, not triaged, with the reason
        assert not event.triage_eligible and event.not_triaged_reason


def dcmtk(*args: str) -> list[str]:
    tool = shutil.which(args[0], path="/usr/bin")
    assert tool is not None, f"dcmtk's {args[0]} is required"
    return [tool, *args[1:]]


@pytest.mark.parametrize(
    ("encode", "transfer_syntax", "flags", "lossless"),
    [
        (("dcmcjpls", "+el"), JPEG_LS_LOSSLESS, ("-xt",), True),
        (("dcmcjpls", "+en", "+md", "2"), JPEG_LS_NEAR, ("-xu",), False),
        (("dcmcjpeg", "+ee"), JPEG_EXTENDED, ("-xx",), False),
        (("dcmconv", "+tb"), BIG_ENDIAN, STORESCU_BIG_ENDIAN, True),
    ],
    ids=["jpeg-ls-lossless", "jpeg-ls-near-lossless", "jpeg-extended", "explicit-big-endian"],
)
async def test_dcmtk_reencoded_chest_xray_is_triaged(
    ingest_service: IngestService,
    rabbit: RabbitNode,
    shared_data: Path,
    tmp_path: Path,
    encode: tuple[str, ...],
    transfer_syntax: str,
    flags: tuple[str, ...],
    lossless: bool,
) -> None:
    source = sorted((shared_data / "dicom").glob("*.dcm"))[1]
    plain, out = tmp_path / "plain.dcm", tmp_path / "encoded.dcm"
    for cmd in (
        dcmtk("dcmdjpeg", str(source), str(plain)),  # the shared file is JPEG baseline: decode it first
        dcmtk(*encode, str(plain), str(out)),
        dcmtk("dcmodify", "-nb", "-gin", str(out)),  # a new SOP instance: ingest would see a duplicate
    ):
        res = await run(cmd)
        assert res.returncode == 0, f"{cmd}: {res.stderr}"
    assert str(pydicom.dcmread(out, stop_before_pixels=True).file_meta.TransferSyntaxUID) == transfer_syntax

    await store(ingest_service.dicom_port, out, flags)
    [(_, event)] = await drain(rabbit.url, "inference.images", expected=1)
    assert event.triage_eligible, event.not_triaged_reason  # a DX chest PA: triaged like any other
    assert event.transfer_syntax_uid == transfer_syntax
    shown = check_stored_and_decoded(event, out, transfer_syntax)
    reference = display_array(pydicom.dcmread(plain))
    if lossless:
        assert np.array_equal(shown, reference)
    else:  # lossy: the same image within the encoder's error
        assert float(np.abs(shown - reference).mean()) < 0.02
