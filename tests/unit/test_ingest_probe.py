"""Compressed pixel data is checked by its structure (markers, frame sizes, RLE header), not decoded,
before the C-STORE answer. The probe must agree with a real decoder on real files and refuse what
is structurally broken; what it lets through, a full decode let through as well."""

from __future__ import annotations

import struct
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import UID

from services.ingest.config import IngestSettings
from services.ingest.tools.make_dicom import make_dicom_file
from services.ingest.validate import Action, _probe_frames, decide


@pytest.fixture
def image(shared_data: Path) -> Path:
    return sorted((shared_data / "kermany224" / "train" / "NORMAL").glob("*.jpeg"))[5]


def _probe(ds: pydicom.Dataset) -> str | None:
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    ts = str(ds.file_meta.TransferSyntaxUID)
    return _probe_frames(ds, ts, int(ds.Rows), int(ds.Columns), samples, int(ds.BitsAllocated), frames)


def test_the_probe_agrees_with_the_decoder_on_pydicoms_files() -> None:
    folder = Path(get_testdata_file("CT_small.dcm")).parent
    compared = 0
    for path in sorted(folder.glob("*.dcm")):
        try:
            ds = pydicom.dcmread(path)
            compressed = UID(ds.file_meta.TransferSyntaxUID).is_compressed and "PixelData" in ds
        except Exception:
            continue
        if not compressed:
            continue
        verdict = _probe(ds)
        if verdict is None:
            continue  # not probed: decoded in full, as before
        try:
            _ = ds.pixel_array
            decodes = True
        except Exception:
            decodes = False
        assert (verdict == "") == decodes, (path.name, verdict)
        compared += 1
    assert compared >= 30


def _with_first_frame(path: Path, change) -> Path:  # type: ignore[no-untyped-def]
    ds = pydicom.dcmread(path)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    change(frame)
    ds.PixelData = encapsulate([bytes(frame)])
    out = path.with_name("changed-" + path.name)
    ds.save_as(out, enforce_file_format=True)
    return out


def test_a_jpeg_frame_of_the_wrong_size_is_refused(image: Path, tmp_path: Path) -> None:
    path = make_dicom_file(image, tmp_path, transfer_syntax="jpeg-baseline", size=256)

    def shrink(frame: bytearray) -> None:
        sof = frame.find(b"\xff\xc0")
        frame[sof + 5 : sof + 7] = struct.pack(">H", 200)  # frame height 200, Rows says 256

    d = decide(_with_first_frame(path, shrink), IngestSettings())
    assert (d.action, d.reason_code) == (Action.REFUSE, "undecodable_pixels")
    assert "200x256" in d.reason


def test_an_rle_header_with_the_wrong_segment_count_is_refused(image: Path, tmp_path: Path) -> None:
    path = make_dicom_file(image, tmp_path, transfer_syntax="rle", bits=16, size=256)

    def three_segments(frame: bytearray) -> None:
        frame[0:4] = struct.pack("<L", 3)

    d = decide(_with_first_frame(path, three_segments), IngestSettings())
    assert (d.action, d.reason_code) == (Action.REFUSE, "undecodable_pixels")


@pytest.mark.parametrize(("syntax", "bits"), [("jpeg2000", 16), ("jpeg-baseline", 8), ("jpeg-lossless", 16)])
def test_corrupt_coded_data_passes_the_probe_as_it_passed_a_full_decode(
    image: Path, tmp_path: Path, syntax: str, bits: int
) -> None:
    """What the probe gives up: nothing a full decode caught. Noise in the coded data (markers
    intact) decodes without an error, so the decode that ran here before accepted it too."""
    path = make_dicom_file(image, tmp_path, transfer_syntax=syntax, bits=bits, size=256)

    def scramble(frame: bytearray) -> None:
        for i in range(len(frame) // 2, len(frame) - 4):
            frame[i] = 0xFF

    changed = _with_first_frame(path, scramble)
    assert decide(changed, IngestSettings()).action is Action.ACCEPT
    assert pydicom.dcmread(changed).pixel_array.shape == (256, 256)
