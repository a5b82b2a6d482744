"""Wrap chest X-ray JPEG/PNG images as realistic DX (or CR) DICOM files in a chosen transfer syntax.

Tests and benchmarks need DICOM that looks like what a modality sends: Digital X-Ray Image Storage -
For Presentation (or CR Image Storage), 8/12/16-bit grayscale, MONOCHROME1 or 2, a window, pixel
spacing, view position, patient age, and one study/series per patient. The patient comes from the
Kermany file name (`personNNN_bacteria_MMM.jpeg` -> NNN, `IM-XXXX-YYYY.jpeg` -> XXXX,
`NORMAL2-IM-XXXX-YYYY.jpeg` -> NORMAL2-XXXX). UIDs are derived deterministically from the image
and the options, so making the same file twice gives the same SOP instance (handy for idempotency
tests); `uid_salt` makes distinct copies.

Encoders: uncompressed, implicit and deflate are written by pydicom; RLE and JPEG 2000 (lossless and
lossy) by pydicom's encoders (pylibjpeg-rle / pylibjpeg-openjpeg); JPEG baseline by Pillow
(encapsulated by pydicom); JPEG lossless (process 14 and 14 SV1) by dcmtk's dcmcjpeg, since no
Python encoder for them is maintained.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    JPEG2000,
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

DCMCJPEG = "/usr/bin/dcmcjpeg"
UID_ROOT = "1.2.826.0.1.3680043.10.1234."  # private-looking root for generated test data (not registered)

TRANSFER_SYNTAXES: dict[str, UID] = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "deflate": DeflatedExplicitVRLittleEndian,
    "jpeg-baseline": JPEGBaseline8Bit,
    "jpeg-lossless": JPEGLosslessSV1,
    "jpeg-lossless-14": JPEGLossless,
    "jpeg2000": JPEG2000Lossless,
    "jpeg2000-lossy": JPEG2000,
    "rle": RLELossless,
}
LOSSY = {JPEGBaseline8Bit, JPEG2000}
VIEW_ORIENTATION = {"PA": ["L", "F"], "AP": ["R", "F"], "LL": ["A", "F"]}
SOP_CLASS_FOR = {
    ("DX", "presentation"): DigitalXRayImageStorageForPresentation,
    ("DX", "processing"): DigitalXRayImageStorageForProcessing,
    ("CR", "presentation"): ComputedRadiographyImageStorage,
    ("CR", "processing"): ComputedRadiographyImageStorage,
}

_PERSON = re.compile(r"person(\d+)_", re.IGNORECASE)
_IM = re.compile(r"^(NORMAL2-)?IM-(\d+)-\d+", re.IGNORECASE)


def patient_key(image_path: Path | str) -> str:
    """The patient a Kermany file name belongs to (see ../shared/data/README.md); the stem otherwise."""
    name = Path(image_path).name
    if m := _PERSON.search(name):
        return m.group(1)
    if m := _IM.match(name):
        return f"{'NORMAL2-' if m.group(1) else ''}{m.group(2)}"
    return Path(image_path).stem


def _uid(*parts: object) -> UID:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[str(p) for p in parts])


@dataclass(frozen=True)
class DicomOptions:
    transfer_syntax: str = "explicit"
    photometric: str = "MONOCHROME2"
    bits: int = 8
    view: str = "PA"
    modality: str = "DX"
    intent: str = "presentation"  # DX "for presentation" | "for processing"
    age: str = "005Y"
    patient_name: str | None = None
    size: int | None = None  # resample to size x size (benchmarks want realistic sizes)
    uid_salt: str = ""
    # today (UTC) by default: a made study is a fresh one (ingest's lanes class older ones as backfill)
    study_date: str = field(default_factory=lambda: datetime.now(UTC).strftime("%Y%m%d"))

    def validate(self) -> None:
        if self.transfer_syntax not in TRANSFER_SYNTAXES:
            raise ValueError(f"unknown transfer syntax {self.transfer_syntax!r}: one of {sorted(TRANSFER_SYNTAXES)}")
        if self.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
        if self.bits not in (8, 12, 16):
            raise ValueError("bits must be 8, 12 or 16")
        if self.transfer_syntax == "jpeg-baseline" and self.bits != 8:
            raise ValueError("JPEG baseline carries 8-bit samples only: use --bits 8 or a lossless syntax")
        if self.view not in VIEW_ORIENTATION:
            raise ValueError(f"view must be one of {sorted(VIEW_ORIENTATION)}")
        if (self.modality, self.intent) not in SOP_CLASS_FOR:
            raise ValueError("modality must be DX or CR, intent presentation or processing")
        if not re.fullmatch(r"\d{3}[DWMY]", self.age):
            raise ValueError("age is a DICOM AS value such as 005Y, 018M")


def load_grayscale(image_path: Path | str, size: int | None = None) -> np.ndarray:
    """8-bit grayscale pixels of a JPEG/PNG (the Kermany copies are 3-channel grey)."""
    with Image.open(image_path) as img:
        grey = img.convert("L")
        if size:
            grey = grey.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(grey, dtype=np.uint8)


def _scale(pixels8: np.ndarray, bits: int, photometric: str) -> np.ndarray:
    """Map 8-bit display grey to the stored range; MONOCHROME1 stores bright as low values."""
    if bits == 8:
        out = pixels8.astype(np.uint8)
        return (255 - out).astype(np.uint8) if photometric == "MONOCHROME1" else out
    top = (1 << bits) - 1
    # spread the values over the detector range with a little gamma, as a raw-ish log image looks
    out = np.rint(((pixels8.astype(np.float64) / 255.0) ** 1.1) * top).astype(np.uint16)
    return (top - out).astype(np.uint16) if photometric == "MONOCHROME1" else out


# ViewCodeSequence (CID 4010) for each view make-dicom writes
VIEW_CODES = {
    "PA": ("399348003", "SCT", "postero-anterior"),
    "AP": ("399182009", "SCT", "antero-posterior"),
    "LL": ("399173006", "SCT", "left lateral"),
}


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def _dataset(image_path: Path, pixels: np.ndarray, opts: DicomOptions) -> Dataset:
    content = hashlib.sha256(Path(image_path).read_bytes()).hexdigest()
    patient = patient_key(image_path)
    rows, cols = pixels.shape
    sop_class = SOP_CLASS_FOR[(opts.modality, opts.intent)]
    study_uid = _uid("study", patient, opts.uid_salt)
    series_uid = _uid("series", patient, opts.modality, opts.view, opts.uid_salt)
    sop_uid = _uid("sop", content, *(str(v) for v in vars(opts).values()))

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY"] if opts.modality == "CR" else ["ORIGINAL", "PRIMARY", ""]
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = ds.AcquisitionDate = opts.study_date
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = ds.AcquisitionTime = "093000"
    ds.AccessionNumber = f"ACC{hashlib.sha1(f'{patient}{opts.uid_salt}'.encode()).hexdigest()[:8].upper()}"
    ds.Modality = opts.modality
    ds.PresentationIntentType = "FOR PRESENTATION" if opts.intent == "presentation" else "FOR PROCESSING"
    ds.Manufacturer = "PneumoTriage make-dicom"
    ds.InstitutionName = "Guangzhou Women and Children's Medical Center (sample)"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "XR CHEST 1 VIEW"
    ds.SeriesDescription = f"CHEST {opts.view}"
    ds.ManufacturerModelName = "make-dicom"
    ds.PatientName = opts.patient_name or f"Kermany^Patient{patient}"
    ds.PatientID = f"KERMANY-{patient}"
    age_years = int(opts.age[:3]) if opts.age.endswith("Y") else 0
    birth_year = int(opts.study_date[:4]) - age_years
    ds.PatientBirthDate = f"{birth_year:04d}0615"
    ds.PatientSex = "O"
    ds.PatientAge = opts.age
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = opts.view
    ds.PatientOrientation = VIEW_ORIENTATION[opts.view]
    ds.KVP = "70"
    ds.DistanceSourceToDetector = "1000"
    ds.ExposureTime = "10"
    ds.XRayTubeCurrent = "200"
    ds.DetectorType = "SCINTILLATOR"
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = "1"
    ds.InstanceNumber = "1"
    # the chest is an unpaired body part: no (series) Laterality, ImageLaterality U (dciodvfy: 0 errors)
    ds.AnatomicRegionSequence = [_code("43799004", "SCT", "Chest")]
    ds.ViewCodeSequence = [_code(*VIEW_CODES[opts.view])]
    if opts.modality == "DX":  # DX Anatomy Imaged, DX Positioning, DX Image, Acquisition Context
        ds.ImageLaterality = "U"
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
    # a pediatric chest field of view of ~ 250 mm across the image
    spacing = f"{250.0 / max(rows, cols):.4f}"
    ds.PixelSpacing = [spacing, spacing]
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.PixelSpacingCalibrationDescription = "assumed 250 mm field of view (made by make-dicom)"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = opts.photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 8 if opts.bits == 8 else 16
    ds.BitsStored = opts.bits
    ds.HighBit = opts.bits - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = -1 if opts.photometric == "MONOCHROME1" else 1
    if opts.modality == "DX":
        ds.PresentationLUTShape = "INVERSE" if opts.photometric == "MONOCHROME1" else "IDENTITY"
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    if opts.intent == "presentation" or opts.modality == "CR":  # a DX VOI LUT only For Presentation
        lo, hi = np.percentile(pixels, [1, 99])
        ds.WindowCenter = f"{(lo + hi) / 2:.1f}"
        ds.WindowWidth = f"{max(hi - lo, 1):.1f}"
        ds.VOILUTFunction = "LINEAR"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "01"  # the source JPEG already was lossy
    ds.LossyImageCompressionMethod = "ISO_10918_1"
    ds.LossyImageCompressionRatio = "10"
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB" if opts.bits == 8 else "OW"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "PT_MAKEDICOM"
    ds.file_meta = meta
    return ds


def _jpeg_baseline(ds: Dataset, pixels: np.ndarray, quality: int = 90) -> None:
    buf = BytesIO()
    Image.fromarray(pixels, mode="L").save(buf, format="JPEG", quality=quality)
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.LossyImageCompressionMethod = ["ISO_10918_1", "ISO_10918_1"]


def _dcmcjpeg(ds: Dataset, flags: list[str]) -> Dataset:
    """Compress with dcmtk (the only maintained JPEG lossless encoder at hand)."""
    with tempfile.TemporaryDirectory(prefix="pt-makedicom-") as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        ds.save_as(src, enforce_file_format=True)
        res = subprocess.run([DCMCJPEG, *flags, str(src), str(dst)], capture_output=True, text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"dcmcjpeg failed: {res.stderr.strip()}")
        return pydicom.dcmread(dst)


def make_dicom(image_path: Path | str, options: DicomOptions | None = None, **overrides: object) -> Dataset:
    """Build the DICOM data set (with file meta, already in the chosen transfer syntax) for one image."""
    opts = options or DicomOptions()
    if overrides:
        opts = DicomOptions(**{**vars(opts), **overrides})  # type: ignore[arg-type]
    opts.validate()
    image_path = Path(image_path)
    pixels = _scale(load_grayscale(image_path, opts.size), opts.bits, opts.photometric)
    ds = _dataset(image_path, pixels, opts)
    ts = TRANSFER_SYNTAXES[opts.transfer_syntax]
    if ts == ImplicitVRLittleEndian or ts == DeflatedExplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ts
        if ts == ImplicitVRLittleEndian:
            ds["PixelData"].VR = "OW"  # implicit VR: pixel data is OW by convention
    elif ts == JPEGBaseline8Bit:
        _jpeg_baseline(ds, pixels)
    elif ts in (JPEGLosslessSV1, JPEGLossless):
        flags = ["+e1"] if ts == JPEGLosslessSV1 else ["+el", "+sv", "6"]
        ds = _dcmcjpeg(ds, flags)
    elif ts == RLELossless:
        ds.compress(RLELossless, generate_instance_uid=False)
    elif ts == JPEG2000Lossless:
        ds.compress(JPEG2000Lossless, generate_instance_uid=False)
    elif ts == JPEG2000:
        ds.compress(JPEG2000, j2k_cr=[15], generate_instance_uid=False)
        ds.LossyImageCompressionMethod = ["ISO_10918_1", "ISO_15444_1"]
    if ts in LOSSY:
        ds.LossyImageCompressionRatio = ["10", "15"]
    return ds


def write_dicom(ds: Dataset, path: Path | str) -> Path:
    """Write a data set made by make_dicom as a DICOM Part 10 file in its own transfer syntax."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ts = UID(ds.file_meta.TransferSyntaxUID)
    ds.save_as(path, enforce_file_format=True, implicit_vr=ts.is_implicit_VR, little_endian=True)
    return path


def make_dicom_file(
    image_path: Path | str, out_dir: Path | str, options: DicomOptions | None = None, **kw: object
) -> Path:
    """make_dicom + write_dicom into out_dir/<image stem>.dcm (suffixed with the syntax when not explicit)."""
    opts = options or DicomOptions()
    if kw:
        opts = DicomOptions(**{**vars(opts), **kw})  # type: ignore[arg-type]
    ds = make_dicom(image_path, opts)
    stem = Path(image_path).stem
    suffix = "" if opts.transfer_syntax == "explicit" else f".{opts.transfer_syntax}"
    return write_dicom(ds, Path(out_dir) / f"{stem}{opts.uid_salt and '.' + opts.uid_salt}{suffix}.dcm")
