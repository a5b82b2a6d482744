"""The heatmap where the radiologist looks (issue 23, item 3): a DICOM Secondary Capture per judged
image, in the image's study, in a series of its own, showing the X-ray with the model's heatmap
over it and burned in: the flag, P(pneumonia), the model version and "diagnostic aid — not a
diagnosis".

`build_heatmap_sc` makes the object (RGB, 8 bits, Explicit VR Little Endian; BurnedInAnnotation
YES; the source image referenced in Source Image Sequence) from the stored image's data set and
the heatmap PNG the inference service wrote (services/inference/heatmaps.py). The SC's Series and
SOP Instance UIDs are derived from the study / source image and the revision, so a re-send is the
same object. Passes dciodvfy with 0 errors (tests/unit/test_dicom_dciodvfy.py).

Sent with PT_AGGREGATOR_SEND_HEATMAP_SC: frozen with each SR revision and C-STOREd before it on the
same association (service.py `heatmap_scs`, sr_delivery.py `send_batch`; docs/fhir-and-sr.md).
"""

from __future__ import annotations

from datetime import UTC, datetime
from functools import lru_cache
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from services.core.imaging import display_array

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SC_SERIES_NUMBER = 9902
SC_SERIES_DESCRIPTION = "PneumoTriage heatmap (diagnostic aid)"
BANNER = "Diagnostic aid \u2014 not a diagnosis"
# patient and general study modules copied from the source image (type 2: present, may be empty)
PATIENT_STUDY_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)
FONT_PATHS = (
    "/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf",  # Debian's fonts-dejavu-core (./pt test installs it)
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
)


def sc_uids(study_uid: str, source_sop_uid: str, revision: int) -> tuple[str, str]:
    """(series, SOP instance) UIDs: one heatmap series per study, one SC per source image and revision."""
    series = generate_uid(entropy_srcs=["pneumotriage-heatmap-series", study_uid])
    sop = generate_uid(entropy_srcs=["pneumotriage-heatmap", study_uid, source_sop_uid, str(revision)])
    return str(series), str(sop)


@lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    for path in FONT_PATHS:
        if Path(path).is_file():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size)


def render(source: Dataset, heatmap_png: bytes | None, lines: list[str], max_side: int = 1024) -> np.ndarray:
    """RGB pixels [rows, columns, 3]: the image as displayed, the heatmap blended over it (its own
    alpha), and a dark band at the top with `lines` burned in."""
    grey = display_array(source)
    h, w = grey.shape
    scale = min(1.0, max_side / max(h, w))
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    base = Image.fromarray((np.clip(grey, 0, 1) * 255 + 0.5).astype(np.uint8), mode="L").resize(
        size, Image.Resampling.BILINEAR
    )
    canvas = base.convert("RGBA")
    if heatmap_png:
        with Image.open(BytesIO(heatmap_png)) as hm:
            overlay = hm.convert("RGBA").resize(size, Image.Resampling.BILINEAR)
        canvas = Image.alpha_composite(canvas, overlay)
    font_size = max(10, size[0] // 28)
    font = _font(font_size)
    band = round(font_size * 1.35) * len(lines) + font_size // 2
    draw = ImageDraw.Draw(canvas, "RGBA")
    draw.rectangle((0, 0, size[0], band), fill=(0, 0, 0, 190))
    y = font_size // 4
    for line in lines:
        draw.text((font_size // 3, y), line, fill=(255, 255, 255, 255), font=font)
        y += round(font_size * 1.35)
    return np.asarray(canvas.convert("RGB"), dtype=np.uint8)


def build_heatmap_sc(
    source: Dataset,
    heatmap_png: bytes | None,
    *,
    flag: str,
    p_pneumonia: float | None,
    model_version: str,
    revision: int = 1,
    instance_number: int = 1,
) -> Dataset:
    """A Secondary Capture Image of `source` (a stored X-ray's data set, pixels included) with the
    heatmap and the result burned in, in the source's study and a new series."""
    score = "n/a" if p_pneumonia is None else f"{p_pneumonia:.3f}"
    lines = [f"{flag}   P(pneumonia) {score}", f"model {model_version or 'none'}", BANNER]
    pixels = render(source, heatmap_png, lines)
    study_uid = str(source.StudyInstanceUID)
    series_uid, sop_uid = sc_uids(study_uid, str(source.SOPInstanceUID), revision)
    now = datetime.now(UTC)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SOPClassUID = SECONDARY_CAPTURE
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    for kw in PATIENT_STUDY_KEYWORDS:
        setattr(ds, kw, source.get(kw, ""))
    ds.Modality = "OT"
    # the chest is unpaired: no Laterality (dciodvfy asks for one unless the body part says so)
    ds.BodyPartExamined = str(source.get("BodyPartExamined", "") or "CHEST")
    ds.ConversionType = "WSD"  # workstation
    ds.SeriesNumber = SC_SERIES_NUMBER
    ds.SeriesDescription = SC_SERIES_DESCRIPTION
    ds.InstanceNumber = instance_number
    ds.PatientOrientation = source.get("PatientOrientation", "") or ""
    ds.Manufacturer = "PneumoTriage"
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.InstanceCreationDate, ds.InstanceCreationTime = ds.ContentDate, ds.ContentTime
    ds.DerivationDescription = "X-ray with the model's class-activation heatmap and its result burned in"
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ds.SourceImageSequence = DicomSequence([ref])
    ds.BurnedInAnnotation = "YES"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.Rows, ds.Columns = int(pixels.shape[0]), int(pixels.shape[1])
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"
    return ds


def encode_sc(ds: Dataset) -> bytes:
    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
