"""Real chest X-rays from ../shared/data wrapped as DX DICOM (JPEG baseline), for system tests.

Each call makes new UIDs, so a run of N images is N distinct SOP instances (two images per study
for a third of them, so study-level results are exercised too). The pixels are the shared JPEGs'
own (re-encoded as 8-bit grey); the patient fields are fake markers (never real PHI).
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import JPEGBaseline8Bit, generate_uid

DX_FOR_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"


@dataclass(frozen=True)
class MadeImage:
    path: Path
    source: Path
    label: str  # NORMAL | PNEUMONIA
    sop_instance_uid: str
    study_instance_uid: str


def pick_xrays(shared_data: Path, n: int, seed: int = 7) -> list[tuple[Path, str]]:
    """n JPEGs from the training set, about the data set's class balance, deterministic."""
    root = shared_data / "kermany224" / "train"
    normal = sorted((root / "NORMAL").glob("*.jpeg"))
    pneumonia = sorted((root / "PNEUMONIA").glob("*.jpeg"))
    rng = random.Random(seed)
    n_normal = max(1, round(n * 0.35))
    chosen = [(p, "NORMAL") for p in rng.sample(normal, n_normal)]
    chosen += [(p, "PNEUMONIA") for p in rng.sample(pneumonia, n - n_normal)]
    rng.shuffle(chosen)
    return chosen


def make_dx(source: Path, out: Path, index: int, study_uid: str, series_uid: str, instance: int) -> MadeImage:
    img = Image.open(source).convert("L")
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_FOR_PRESENTATION
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds = FileDataset(str(out), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_FOR_PRESENTATION
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "AP"
    ds.SeriesDescription = "CHEST AP"
    ds.PatientName = f"Systest^Patient{index}"
    ds.PatientID = f"SYSTEST-{index}"
    ds.AccessionNumber = f"SYSACC{index}"
    ds.PatientAge = "004Y"
    ds.PatientSex = "O"
    ds.StudyDate = datetime.now(UTC).strftime("%Y%m%d")  # a fresh study (older ones are the backfill lane)
    ds.StudyTime = "120000"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = img.height, img.width
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.LossyImageCompression = "01"
    ds.PixelData = encapsulate([buf.getvalue()])
    ds["PixelData"].VR = "OB"
    ds.set_original_encoding(False, True)  # explicit VR little endian (JPEG is encapsulated)
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    label = "PNEUMONIA" if "PNEUMONIA" in source.parts else "NORMAL"
    return MadeImage(out, source, label, sop_uid, study_uid)


def make_study_set(shared_data: Path, out_dir: Path, n: int, seed: int = 7) -> list[MadeImage]:
    """n DX files under out_dir; every third study holds two images."""
    made: list[MadeImage] = []
    study_uid = series_uid = ""
    for i, (source, _label) in enumerate(pick_xrays(shared_data, n, seed)):
        instance = 2 if (i % 3 == 1 and study_uid) else 1
        if instance == 1:
            study_uid, series_uid = generate_uid(), generate_uid()
        made.append(make_dx(source, out_dir / f"img{i:05d}.dcm", i, study_uid, series_uid, instance))
    return made


def read_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
