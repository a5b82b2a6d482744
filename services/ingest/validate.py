"""Acceptance policy for one received instance (DESIGN "Ingest acceptance", docs/dicom-conformance.md).

Three outcomes:
- ACCEPT: stored and triaged (ImageReceived, triage_eligible=true);
- STORE_ONLY: a valid image outside the triage workflow (e.g. a lateral view, not a chest, colour):
  stored, answered 0x0000, ImageReceived with triage_eligible=false and not_triaged_reason;
- REFUSE: not stored, answered with a failure status (ImageRejected with reason_code and status).

The decision never contains patient-identifying values: only UIDs, codes and image geometry.
"""

from __future__ import annotations

import enum
import re
import struct
from dataclasses import dataclass, field
from datetime import date
from io import BytesIO
from pathlib import Path

import pydicom
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import UID
from pynetdicom import sop_class as sc

from services.core.imaging import patient_age_years
from services.ingest.config import IngestSettings
from services.ingest.transfer_syntaxes import TRANSFER_SYNTAXES, PixelCheck, checked_by

UNDEFINED_LENGTH = 0xFFFFFFFF
PIXEL_DATA = 0x7FE00010
# Values longer than this are not read while validating (pydicom defers them); native Pixel Data is
# checked by its declared length against the bytes the file holds, never copied into memory.
DEFER_BYTES = 64 << 10

# C-STORE statuses we answer (PS3.4 B.2.3, PS3.7 C). ErrorComment carries the reason code.
SUCCESS = 0x0000
SOP_CLASS_NOT_SUPPORTED = 0x0122  # Refused: SOP Class not supported
OUT_OF_RESOURCES = 0xA700  # Refused: out of resources (store or database unavailable)
DATASET_MISMATCH = 0xA900  # Error: data set does not match SOP class
DUPLICATE_SOP_INSTANCE = 0x0111  # Failure: duplicate SOP instance (the UID is stored with other content)
CANNOT_PARSE = 0xC210  # Error: cannot understand - data set cannot be parsed
UNDECODABLE_PIXELS = 0xC211  # Error: cannot understand - pixel data cannot be decoded
IMAGE_TOO_LARGE = 0xC212  # Error: cannot understand - dimensions beyond the configured limits

# Syntaxes read whole through a decompressor (parse): a tuple, so that `in` compares and never
# hashes a malformed Transfer Syntax UID value.
DEFLATED: tuple[str, ...] = tuple(ts.uid for ts in TRANSFER_SYNTAXES if ts.pydicom_uid.is_deflated)

# Storage SOP classes we keep (and triage when the workflow checks pass).
XRAY_SOP_CLASSES: frozenset[str] = frozenset(
    {
        sc.ComputedRadiographyImageStorage,
        sc.DigitalXRayImageStorageForPresentation,
        sc.DigitalXRayImageStorageForProcessing,
        sc.DigitalMammographyXRayImageStorageForPresentation,
        sc.DigitalMammographyXRayImageStorageForProcessing,
        sc.DigitalIntraOralXRayImageStorageForPresentation,
        sc.DigitalIntraOralXRayImageStorageForProcessing,
    }
)
SECONDARY_CAPTURE_SOP_CLASSES: frozenset[str] = frozenset(
    {
        sc.SecondaryCaptureImageStorage,
        sc.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
        sc.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
        sc.MultiFrameSingleBitSecondaryCaptureImageStorage,
        sc.MultiFrameTrueColorSecondaryCaptureImageStorage,
    }
)
IMAGE_SOP_CLASSES = XRAY_SOP_CLASSES | SECONDARY_CAPTURE_SOP_CLASSES
# The refusal of a well-formed instance of another SOP class (CT, SR, PDF, ...): the one refusal
# PT_INGEST_OUT_OF_SCOPE=accept-and-discard turns into a success that stores nothing.
OUT_OF_SCOPE_CODE = "unsupported_sop_class"


class Action(enum.StrEnum):
    ACCEPT = "accept"
    STORE_ONLY = "store_only"
    REFUSE = "refuse"


DATE_KEYWORDS = (
    "AcquisitionDateTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "ContentDate",
    "ContentTime",
    "SeriesDate",
    "SeriesTime",
    "StudyDate",
    "StudyTime",
)


@dataclass
class Decision:
    action: Action
    status: int = SUCCESS
    reason_code: str = ""
    reason: str = ""
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    transfer_syntax_uid: str = ""
    modality: str = ""
    body_part_examined: str = ""
    view_position: str = ""
    rows: int = 0
    columns: int = 0
    frames: int = 1
    photometric_interpretation: str = ""
    patient_age_years: int = -1
    outside_intended_use: bool = False
    intended_use_note: str = ""
    not_triaged_codes: list[str] = field(default_factory=list)
    # Header date/time values the lane rules read (services/ingest/lane_rules.py), and the lane chosen.
    dates: dict[str, str] = field(default_factory=dict)
    lane: str = ""
    lane_reason: str = ""

    @property
    def stored(self) -> bool:
        return self.action is not Action.REFUSE

    @property
    def triage_eligible(self) -> bool:
        return self.action is Action.ACCEPT

    @property
    def not_triaged_reason(self) -> str:
        """Why a stored image is not triaged ("" when it is)."""
        return "" if self.triage_eligible else self.reason


class Refusal(Exception):
    def __init__(self, status: int, code: str, reason: str, study: str = "", series: str = "") -> None:
        super().__init__(reason)
        self.status, self.code, self.reason = status, code, reason
        self.study, self.series = study, series  # when known (a non-image's study: PT_INGEST_OUT_OF_SCOPE)
        self.sop_class, self.sop_instance = "", ""


def _text(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword, "")
    except Exception:  # a malformed element: treat as absent
        return ""
    if isinstance(value, pydicom.multival.MultiValue):
        value = "\\".join(str(v) for v in value)
    return str(value or "").strip()


def _int(ds: Dataset, keyword: str, default: int = 0) -> int:
    try:
        value = ds.get(keyword)
        return default if value in (None, "") else int(value)
    except (TypeError, ValueError) as exc:
        raise Refusal(DATASET_MISMATCH, "bad_image_attribute", f"{keyword} is not an integer") from exc


def parse(data: bytes | Path) -> Dataset:
    """Parse a Part 10 file or byte string, or raise Refusal.

    Every element's header and length is checked (a truncated element is a refusal); values are
    converted when the policy reads them, so a malformed value in an element the policy does not use
    is stored as received (inference reads the image again, and dead-letters what it cannot read)."""
    size = _size(data)
    if not size:
        raise Refusal(CANNOT_PARSE, "empty_dataset", "the data set is empty")
    try:
        ds = pydicom.dcmread(BytesIO(data) if isinstance(data, bytes) else data, force=True, defer_size=DEFER_BYTES)
        if ds.file_meta.get("TransferSyntaxUID") in DEFLATED:
            # read through a decompressor: value positions are not file offsets, so defer nothing
            ds = pydicom.dcmread(BytesIO(data) if isinstance(data, bytes) else data, force=True)
            size = UNDEFINED_LENGTH  # the inflated length is unknown: _check_complete checks read values only
        _check_complete(ds, size)
    except Refusal:
        raise
    except Exception as exc:  # pydicom raises many kinds on fuzzed input; any is "cannot understand"
        raise Refusal(CANNOT_PARSE, "cannot_parse", f"the data set cannot be parsed: {type(exc).__name__}") from exc
    if len(ds) == 0:
        raise Refusal(CANNOT_PARSE, "empty_dataset", "the data set has no elements")
    return ds


def _deferred(elem: object) -> bool:
    return isinstance(elem, RawDataElement) and elem.value is None and elem.length not in (0, UNDEFINED_LENGTH)


def _check_complete(ds: Dataset, size: int) -> None:
    """pydicom reads a truncated stream with only a warning: an element shorter than its length is a refusal."""
    for tag in ds.keys():
        elem = ds.get_item(tag, keep_deferred=True)
        if not isinstance(elem, RawDataElement) or elem.length == UNDEFINED_LENGTH:
            continue
        if elem.value is None:
            if elem.length and elem.value_tell + elem.length > size:  # deferred: check the file holds it
                raise Refusal(CANNOT_PARSE, "truncated", f"data set truncated inside element {tag}")
        elif len(elem.value) < elem.length:
            raise Refusal(CANNOT_PARSE, "truncated", f"data set truncated inside element {tag}")


def _size(data: bytes | Path) -> int:
    return len(data) if isinstance(data, bytes) else data.stat().st_size


def _pixel_bytes(ds: Dataset, size: int) -> int:
    """Bytes of native Pixel Data, without reading a deferred value (size: bytes of the whole file)."""
    elem = ds.get_item(PIXEL_DATA, keep_deferred=True)
    if _deferred(elem):
        assert isinstance(elem, RawDataElement)
        return min(elem.length, max(0, size - elem.value_tell))
    return len(ds.PixelData)


def _age_years(ds: Dataset) -> int | None:
    age = patient_age_years(ds)
    if age is not None:
        return age
    born, seen = _text(ds, "PatientBirthDate"), _text(ds, "StudyDate") or _text(ds, "ContentDate")
    if len(born) >= 8 and len(seen) >= 8 and born[:8].isdigit() and seen[:8].isdigit():
        try:
            b = date(int(born[:4]), int(born[4:6]), int(born[6:8]))
            s = date(int(seen[:4]), int(seen[4:6]), int(seen[6:8]))
        except ValueError:
            return None
        years = s.year - b.year - ((s.month, s.day) < (b.month, b.day))
        return years if years >= 0 else None
    return None


def _check_pixels(ds: Dataset, settings: IngestSettings, size: int) -> tuple[int, int, int]:
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise Refusal(DATASET_MISMATCH, "float_pixel_data", "float pixel data is not an X-ray image")
        raise Refusal(DATASET_MISMATCH, "missing_pixel_data", "the image has no Pixel Data")
    missing = [k for k in ("Rows", "Columns", "BitsAllocated", "PhotometricInterpretation") if k not in ds]
    if missing:
        raise Refusal(DATASET_MISMATCH, "missing_image_attributes", f"required attributes missing: {missing}")
    rows, cols = _int(ds, "Rows"), _int(ds, "Columns")
    frames = _int(ds, "NumberOfFrames", 1) or 1
    samples, bits = _int(ds, "SamplesPerPixel", 1) or 1, _int(ds, "BitsAllocated")
    if rows <= 0 or cols <= 0 or frames <= 0 or bits not in (1, 8, 16, 32) or samples not in (1, 3):
        raise Refusal(DATASET_MISMATCH, "bad_image_attributes", f"impossible geometry {rows}x{cols}x{frames}")
    if max(rows, cols) > settings.max_side or rows * cols * frames > settings.max_pixels:
        raise Refusal(IMAGE_TOO_LARGE, "image_too_large", f"{rows}x{cols}x{frames} exceeds the configured limits")
    ts = UID(ds.file_meta.get("TransferSyntaxUID", "1.2.840.10008.1.2.1"))
    if not ts.is_compressed:
        expected = (rows * cols * frames * samples * bits + 7) // 8
        actual = _pixel_bytes(ds, size)
        if actual < expected:
            raise Refusal(
                DATASET_MISMATCH, "pixel_length_mismatch", f"Pixel Data holds {actual} bytes, {expected} expected"
            )
        return rows, cols, frames  # complete native pixel data: nothing to decode
    probed = _probe_frames(ds, ts, rows, cols, samples, bits, frames)
    if probed is not None:  # a known codestream: its structure was checked, no decode needed
        if probed:
            raise Refusal(UNDECODABLE_PIXELS, "undecodable_pixels", probed)
        return rows, cols, frames
    try:
        arr = ds.pixel_array  # another compressed syntax: decode (every frame) to prove it is sound
    except Exception as exc:
        raise Refusal(UNDECODABLE_PIXELS, "undecodable_pixels", f"pixel data cannot be decoded: {exc!s:.200}") from exc
    if arr.size == 0:
        raise Refusal(UNDECODABLE_PIXELS, "undecodable_pixels", "pixel data decodes to an empty array")
    return rows, cols, frames


# --- compressed pixel data: a structural probe instead of a full decode -----------------------------
# which syntaxes each probe reads: the table's PixelCheck (the other compressed ones are decoded)
JPEG_SYNTAXES = checked_by(PixelCheck.JPEG)
J2K_SYNTAXES = checked_by(PixelCheck.J2K)
RLE_SYNTAXES = checked_by(PixelCheck.RLE)
SOF_MARKERS = frozenset({*range(0xC0, 0xC4), *range(0xC5, 0xC8), *range(0xC9, 0xCC), *range(0xCD, 0xD0), 0xF7})


def _jpeg_frame_size(data: bytes) -> tuple[int, int, int] | str | None:
    """(rows, columns, components) from a JPEG / JPEG-LS stream's frame header, or what is wrong;
    None when the stream lacks its end marker (decoders accept some such streams: let one decide)."""
    if data[:2] != b"\xff\xd8":
        return "no JPEG start-of-image marker"
    if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return None
    i = 2
    while i + 4 <= len(data):
        if data[i] != 0xFF:
            return "malformed JPEG marker segment"
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            i += 2
            continue
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker in SOF_MARKERS:
            if i + 10 > len(data):
                return "truncated JPEG frame header"
            height, width = struct.unpack_from(">HH", data, i + 5)
            return height, width, data[i + 9]
        if marker == 0xDA:
            return "JPEG scan before any frame header"
        i += 2 + length
    return "no JPEG frame header"


def _j2k_frame_size(data: bytes) -> tuple[int, int, int] | str | None:
    """(rows, columns, components) from a JPEG 2000 codestream's SIZ segment, or what is wrong; None
    for a JP2 file or a codestream without its end marker."""
    if data[:4] != b"\xff\x4f\xff\x51":
        return None if data[4:8] == b"jP  " else "no JPEG 2000 codestream start (SOC, SIZ)"
    if len(data) < 44:
        return "truncated JPEG 2000 header"
    if data.rstrip(b"\x00")[-2:] != b"\xff\xd9":
        return None  # no end-of-codestream marker: as for JPEG, the decoder decides
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">IIII", data, 8)
    (components,) = struct.unpack_from(">H", data, 40)
    return ysiz - yosiz, xsiz - xosiz, components


def _rle_check(data: bytes, samples: int, bits: int) -> str:
    if len(data) < 64:
        return "truncated RLE header"
    header = struct.unpack_from("<16L", data, 0)
    segments, offsets = header[0], [o for o in header[1:] if o]
    if segments != samples * ((bits + 7) // 8) or len(offsets) != segments:
        return f"RLE header lists {segments} segments, {samples * ((bits + 7) // 8)} expected"
    if offsets[0] != 64 or offsets != sorted(set(offsets)) or offsets[-1] >= len(data):
        return "RLE segment offsets out of order or past the end"
    return ""


def _probe_frames(ds: Dataset, ts: str, rows: int, cols: int, samples: int, bits: int, frames: int) -> str | None:
    """Check each compressed frame's structure (markers, dimensions): "" when sound, a reason when
    not, None when the syntax (or a JP2 wrapper) is not one we can probe (then it is decoded)."""
    if ts not in JPEG_SYNTAXES and ts not in J2K_SYNTAXES and ts not in RLE_SYNTAXES:
        return None
    try:
        pieces = list(generate_frames(ds.PixelData, number_of_frames=frames))
    except Exception as exc:
        return f"encapsulated pixel data cannot be split into frames: {type(exc).__name__}"
    if len(pieces) != frames:
        return f"{len(pieces)} compressed frames, {frames} expected"
    for data in pieces:
        if ts in RLE_SYNTAXES:
            if problem := _rle_check(data, samples, bits):
                return problem
            continue
        size = _jpeg_frame_size(data) if ts in JPEG_SYNTAXES else _j2k_frame_size(data)
        if size is None:
            return None
        if isinstance(size, str):
            return size
        if size[0] == 0:
            return None  # height given later (DNL marker): let the decoder tell
        if (size[0], size[1]) != (rows, cols) or size[2] != samples:
            return f"frame is {size[0]}x{size[1]}x{size[2]}, the header says {rows}x{cols}x{samples}"
    return ""


def decide(
    data: bytes | Path, settings: IngestSettings, context_sop_class: str = "", command_sop_instance: str = ""
) -> Decision:
    """Validate one Part 10 encoded instance (bytes or a file); never raises for bad input."""
    try:
        return _decide(data, settings, context_sop_class, command_sop_instance)
    except Refusal as r:
        # a discarded non-image is listed under the study it came with; a refusal names no study
        study, series = (r.study, r.series) if settings.out_of_scope == "accept-and-discard" else ("", "")
        return Decision(
            Action.REFUSE,
            status=r.status,
            reason_code=r.code,
            reason=r.reason,
            sop_class_uid=r.sop_class or context_sop_class,
            sop_instance_uid=r.sop_instance or command_sop_instance,
            study_instance_uid=study,
            series_instance_uid=series,
        )
    except OSError:
        raise  # the spool file cannot be read: a resource problem (0xA700), not a bad data set
    except Exception as exc:  # pydicom reads elements lazily: a corrupt one (e.g. an unknown VR) surfaces here
        return Decision(
            Action.REFUSE,
            status=CANNOT_PARSE,
            reason_code="cannot_parse",
            reason=f"a data element cannot be read: {str(exc)[:200]}",
            sop_class_uid=context_sop_class,
            sop_instance_uid=command_sop_instance,
        )


def _decide(
    data: bytes | Path, settings: IngestSettings, context_sop_class: str, command_sop_instance: str
) -> Decision:
    ds = parse(data)
    sop_class, sop_uid = _text(ds, "SOPClassUID"), _text(ds, "SOPInstanceUID")
    if not sop_class or not sop_uid:
        raise Refusal(DATASET_MISMATCH, "missing_uids", "SOP Class UID or SOP Instance UID missing")
    if context_sop_class and sop_class != context_sop_class:
        raise Refusal(DATASET_MISMATCH, "sop_class_mismatch", "SOP Class UID differs from the negotiated one")
    if command_sop_instance and sop_uid != command_sop_instance:
        raise Refusal(DATASET_MISMATCH, "sop_instance_mismatch", "SOP Instance UID differs from the C-STORE request")
    if sop_class not in IMAGE_SOP_CLASSES:
        name = UID(sop_class).name if UID(sop_class).is_valid else sop_class
        refusal = Refusal(
            SOP_CLASS_NOT_SUPPORTED,
            OUT_OF_SCOPE_CODE,
            f"{name} is not an X-ray image class",
            _text(ds, "StudyInstanceUID"),
            _text(ds, "SeriesInstanceUID"),
        )
        refusal.sop_class, refusal.sop_instance = sop_class, sop_uid
        raise refusal
    study, series = _text(ds, "StudyInstanceUID"), _text(ds, "SeriesInstanceUID")
    if not study or not series:
        raise Refusal(DATASET_MISMATCH, "missing_uids", "Study or Series Instance UID missing")
    rows, cols, frames = _check_pixels(ds, settings, _size(data))

    decision = Decision(
        Action.ACCEPT,
        sop_class_uid=sop_class,
        sop_instance_uid=sop_uid,
        study_instance_uid=study,
        series_instance_uid=series,
        transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")),
        modality=_text(ds, "Modality").upper(),
        body_part_examined=_text(ds, "BodyPartExamined").upper(),
        view_position=_text(ds, "ViewPosition").upper(),
        rows=rows,
        columns=cols,
        frames=frames,
        photometric_interpretation=_text(ds, "PhotometricInterpretation").upper(),
    )
    decision.dates = {k: v for k in DATE_KEYWORDS if (v := _text(ds, k))}
    reasons: list[tuple[str, str]] = []
    if decision.modality not in settings.triage_modality_set:
        reasons.append(("wrong_modality", f"modality {decision.modality or '(none)'} is not triaged"))
    if decision.body_part_examined:
        if decision.body_part_examined not in settings.chest_body_part_set:
            reasons.append(("not_chest", f"body part {decision.body_part_examined} is not a chest"))
    else:
        descriptions = " ".join(_text(ds, k) for k in ("SeriesDescription", "StudyDescription", "ProtocolName"))
        if re.search(settings.chest_description_pattern, descriptions, re.IGNORECASE):
            pass  # chest-like description stands in for the missing body part
        else:
            reasons.append(("not_chest", "no body part and no chest-like description"))
    if not decision.view_position:
        reasons.append(("view_unknown", "view position missing"))
    elif decision.view_position not in settings.triage_view_set:
        reasons.append(("view_not_triaged", f"view position {decision.view_position} is not triaged"))
    if decision.photometric_interpretation not in ("MONOCHROME1", "MONOCHROME2") or _int(ds, "SamplesPerPixel", 1) != 1:
        reasons.append(("not_grayscale", f"{decision.photometric_interpretation} is not grayscale"))
    if frames > 1:
        reasons.append(("multi_frame", f"{frames} frames; only single images are triaged"))
    if reasons:
        decision.action = Action.STORE_ONLY
        decision.not_triaged_codes = [code for code, _ in reasons]
        decision.reason_code = reasons[0][0]
        decision.reason = "; ".join(f"{code}: {text}" for code, text in reasons)

    age = _age_years(ds)
    if age is None:
        decision.intended_use_note = "patient age unknown"
    else:
        decision.patient_age_years = age
        if age > settings.max_intended_age_years:
            decision.outside_intended_use = True
            decision.intended_use_note = (
                f"adult patient ({age} y): outside the model's intended use "
                f"(pediatric, 0-{settings.max_intended_age_years} y)"
            )
    return decision
