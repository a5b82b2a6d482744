"""Wrap chest X-ray JPEG/PNG images as realistic DX (or CR) DICOM files in a chosen transfer syntax.

Tests and benchmarks need DICOM that looks like what a modality sends: Digital X-Ray Image Storage -
For Presentation (or CR Image Storage), 8/12/16-bit grayscale, MONOCHROME1 or 2, a window, pixel
spacing, view position, patient age, and one study/series per patient. The patient comes from the
Kermany file name (`personNNN_bacteria_MMM.jpeg` -> NNN, `IM-XXXX-YYYY.jpeg` -> XXXX,
`NORMAL2-IM-XXXX-YYYY.jpeg` -> NORMAL2-XXXX). UIDs are derived deterministically from the image
and the options, so making the same file twice gives the same SOP instance (handy for idempotency
tests); `uid_salt` makes distinct copies.

The syntaxes and how each is written come from the table (services/ingest/transfer_syntaxes.py,
each row's `Recipe`): uncompressed, implicit and deflate are written by pydicom; RLE and JPEG 2000
(lossless and lossy) by pydicom's encoders (pylibjpeg-rle / pylibjpeg-openjpeg); JPEG baseline by
Pillow (encapsulated by pydicom); JPEG lossless (process 14 and 14 SV1) by dcmtk's dcmcjpeg, since
no Python encoder for them is maintained.
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
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    generate_uid,
)

from services.ingest.transfer_syntaxes import RECIPES, Encoder, Recipe, TransferSyntax

DCMTK_BIN = Path("/usr/bin")
UID_ROOT = "1.2.826.0.1.3680043.10.1234."  # private-looking root for generated test data (not registered)

# --transfer-syntax NAME -> its UID, for every syntax the table gives a make-dicom recipe
TRANSFER_SYNTAXES: dict[str, UID] = {name: ts.pydicom_uid for name, (ts, _) in RECIPES.items()}
SOURCE_METHOD, SOURCE_RATIO = "ISO_10918_1", "10"  # the source images are JPEGs (lossy already)
LOSSY_RATIO = "15"  # what a lossy recipe aims at (JPEG 2000's compression ratio)
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
        if self.transfer_syntax not in RECIPES:
            raise ValueError(f"unknown transfer syntax {self.transfer_syntax!r}: one of {sorted(RECIPES)}")
        if self.photometric not in ("MONOCHROME1", "MONOCHROME2"):
            raise ValueError("photometric must be MONOCHROME1 or MONOCHROME2")
        if self.bits not in (8, 12, 16):
            raise ValueError("bits must be 8, 12 or 16")
        ts, recipe = RECIPES[self.transfer_syntax]
        if self.bits not in recipe.bits:
            carried = "/".join(map(str, recipe.bits))
            raise ValueError(f"{ts.name} carries {carried}-bit samples only: use another --bits or syntax")
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
    ds.LossyImageCompressionMethod = SOURCE_METHOD
    ds.LossyImageCompressionRatio = SOURCE_RATIO
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


def _dcmtk(ds: Dataset, args: tuple[str, ...]) -> Dataset:
    """Compress with a dcmtk tool (dcmcjpeg: the only maintained JPEG lossless encoder at hand)."""
    command, *flags = args
    with tempfile.TemporaryDirectory(prefix="pt-makedicom-") as tmp:
        src, dst = Path(tmp) / "in.dcm", Path(tmp) / "out.dcm"
        ds.save_as(src, enforce_file_format=True)
        res = subprocess.run(
            [str(DCMTK_BIN / command), *flags, str(src), str(dst)], capture_output=True, text=True, timeout=120
        )
        if res.returncode != 0:
            raise RuntimeError(f"{command} failed: {res.stderr.strip()}")
        return pydicom.dcmread(dst)


def _encode(ds: Dataset, pixels: np.ndarray, ts: TransferSyntax, recipe: Recipe) -> Dataset:
    """The data set in the row's syntax, written as its recipe says."""
    if recipe.encoder is Encoder.PYDICOM:
        ds.file_meta.TransferSyntaxUID = ts.uid
        if ts.pydicom_uid.is_implicit_VR:
            ds["PixelData"].VR = "OW"  # implicit VR: pixel data is OW by convention
    elif recipe.encoder is Encoder.PILLOW:
        _jpeg_baseline(ds, pixels)
    elif recipe.encoder is Encoder.DCMTK:
        ds = _dcmtk(ds, recipe.args)
    elif recipe.encoder is Encoder.COMPRESS:
        # lossy: JPEG 2000 at a compression ratio (the one lossy syntax written with Dataset.compress)
        lossy = {"j2k_cr": [int(LOSSY_RATIO)]} if recipe.lossy else {}
        ds.compress(ts.uid, generate_instance_uid=False, **lossy)
    if recipe.lossy:  # compressed again, after the source JPEG's compression (_dataset)
        ds.LossyImageCompressionMethod = [SOURCE_METHOD, ts.lossy_method]
        ds.LossyImageCompressionRatio = [SOURCE_RATIO, LOSSY_RATIO]
    return ds


def make_dicom(image_path: Path | str, options: DicomOptions | None = None, **overrides: object) -> Dataset:
    """Build the DICOM data set (with file meta, already in the chosen transfer syntax) for one image."""
    opts = options or DicomOptions()
    if overrides:
        opts = DicomOptions(**{**vars(opts), **overrides})  # type: ignore[arg-type]
    opts.validate()
    image_path = Path(image_path)
    pixels = _scale(load_grayscale(image_path, opts.size), opts.bits, opts.photometric)
    ds = _dataset(image_path, pixels, opts)
    return _encode(ds, pixels, *RECIPES[opts.transfer_syntax])


def write_dicom(ds: Dataset, path: Path | str) -> Path:
    """Write a data set made by make_dicom as a DICOM Part 10 file in its own transfer syntax."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ts = UID(ds.file_meta.TransferSyntaxUID)
    ds.save_as(path, enforce_file_format=True, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian)
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
