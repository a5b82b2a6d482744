"""A corpus of broken or out-of-scope DICOM files, each with the answer docs/dicom-conformance.md promises."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom.sop_class import DigitalXRayImageStorageForPresentation, EncapsulatedPDFStorage

from services.ingest.tools.make_dicom import make_dicom, write_dicom


@dataclass(frozen=True)
class Case:
    name: str
    path: Path
    status: int  # the C-STORE status the SCP must answer
    reason_code: str  # the ErrorComment / ImageRejected.reason_code (or not_triaged code when stored)
    stored: bool = False


def _fresh(image: Path, **kw: object) -> Dataset:
    ds = make_dicom(image, **kw)  # type: ignore[arg-type]
    uid = generate_uid()
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = uid
    return ds


def _meta(sop_class: str, sop_uid: str, ts: str = ExplicitVRLittleEndian) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ts
    return meta


def _retarget(src: Path, out: Path) -> Path:
    """A pydicom test file with a fresh SOP instance UID (so reruns never look like duplicates)."""
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return out


def build_bad_corpus(image: Path, out: Path) -> list[Case]:
    out.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []

    # truncated in the middle of the pixel data (header intact)
    good = write_dicom(_fresh(image, bits=16), out / "truncated-pixels.dcm")
    data = good.read_bytes()
    good.write_bytes(data[: len(data) - len(data) // 3])
    cases.append(Case("truncated_pixels", good, 0xC210, "truncated"))

    # truncated inside the header: an element's length runs past the end
    hdr = write_dicom(_fresh(image), out / "truncated-header.dcm")
    raw = hdr.read_bytes()
    cut = raw.find(b"\x08\x00\x60\x00")  # (0008,0060) Modality: cut inside the next few elements
    hdr.write_bytes(raw[: cut + 30])
    cases.append(Case("truncated_header", hdr, 0xC210, "truncated"))

    # garbage instead of the JPEG stream
    ds = _fresh(image, transfer_syntax="jpeg-baseline")
    rng = random.Random(7)
    ds.PixelData = encapsulate([bytes(rng.randrange(256) for _ in range(5000))])
    cases.append(Case("garbage_pixels", write_dicom(ds, out / "garbage-pixels.dcm"), 0xC211, "undecodable_pixels"))

    # a DX image whose modality says ultrasound: stored, not triaged
    ds = _fresh(image)
    ds.Modality = "US"
    cases.append(Case("wrong_modality", write_dicom(ds, out / "wrong-modality.dcm"), 0x0000, "wrong_modality", True))

    # real CT and MR objects from pydicom's test data
    cases.append(
        Case("ct", _retarget(Path(get_testdata_file("CT_small.dcm")), out / "ct.dcm"), 0x0122, "unsupported_sop_class")
    )
    cases.append(
        Case("mr", _retarget(Path(get_testdata_file("MR_small.dcm")), out / "mr.dcm"), 0x0122, "unsupported_sop_class")
    )

    # an X-ray header without pixel data
    ds = _fresh(image)
    del ds.PixelData
    cases.append(Case("missing_pixels", write_dicom(ds, out / "missing-pixels.dcm"), 0xA900, "missing_pixel_data"))

    # absurd dimensions: 60000 x 60000 claimed
    ds = _fresh(image)
    ds.Rows = ds.Columns = 60000
    cases.append(Case("absurd_dimensions", write_dicom(ds, out / "absurd.dcm"), 0xC212, "image_too_large"))

    # plausible dimensions that the pixel data does not fill
    ds = _fresh(image)
    ds.Rows = ds.Columns = 4000
    cases.append(Case("dimension_mismatch", write_dicom(ds, out / "mismatch.dcm"), 0xA900, "pixel_length_mismatch"))

    # file meta naming a DX instance, then an empty data set (what a 0-byte object looks like on the wire)
    empty = out / "empty-dataset.dcm"
    meta_only = Dataset()
    meta_only.file_meta = _meta(DigitalXRayImageStorageForPresentation, generate_uid())
    meta_only.save_as(empty, enforce_file_format=True)
    cases.append(Case("empty_dataset", empty, 0xC210, "empty_dataset"))

    # an encapsulated PDF
    pdf = Dataset()
    pdf_uid = generate_uid()
    pdf.SOPClassUID, pdf.SOPInstanceUID = EncapsulatedPDFStorage, pdf_uid
    pdf.StudyInstanceUID, pdf.SeriesInstanceUID = generate_uid(), generate_uid()
    pdf.Modality = "DOC"
    pdf.MIMETypeOfEncapsulatedDocument = "application/pdf"
    pdf.EncapsulatedDocument = b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF\n"
    pdf.file_meta = _meta(EncapsulatedPDFStorage, pdf_uid)
    cases.append(Case("encapsulated_pdf", write_dicom(pdf, out / "report.pdf.dcm"), 0x0122, "unsupported_sop_class"))

    # a lateral view: a valid image, stored, not triaged
    cases.append(
        Case("lateral_view", write_dicom(_fresh(image, view="LL"), out / "ll.dcm"), 0x0000, "view_not_triaged", True)
    )
    return cases


def build_fuzzed(image: Path, out: Path, n: int, seed: int = 11) -> list[Path]:
    """n copies of a valid JPEG-baseline DX file with random bytes overwritten in the data set."""
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = []
    for i in range(n):
        ds = _fresh(image, transfer_syntax=str(JPEGBaseline8Bit.keyword and "jpeg-baseline"))
        raw = bytearray(write_dicom(ds, out / f"fuzz-{i}.dcm").read_bytes())
        start = raw.find(b"DICM") + 4 + 200  # leave the file meta group alone: it names the SOP class
        for _ in range(rng.randrange(1, 40)):
            raw[rng.randrange(start, len(raw))] = rng.randrange(256)
        (out / f"fuzz-{i}.dcm").write_bytes(bytes(raw))
        paths.append(out / f"fuzz-{i}.dcm")
    return paths
