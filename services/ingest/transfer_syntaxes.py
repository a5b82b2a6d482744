"""The transfer syntaxes ingest accepts: one table, in our order of preference.

Everything that depends on which syntaxes there are reads this table:
- the SCP's presentation contexts (scp.py: every storage class, in this order; ours decides);
- validation's pixel check before the answer (validate.py: `PixelCheck` of each row);
- `make-dicom` (tools/make_dicom.py and its CLI choices: `Recipe` of each row);
- the conformance statement's table (docs/dicom-conformance.md section 3, written from this table by
  `python -m services.ingest.tools.conformance_doc`; tests/unit/test_transfer_syntaxes.py fails
  when the two differ, and when a consumer disagrees with the table).

Each row names its UID (pydicom's keyword beside it). The syntax's name and how it encodes a data
set (implicit or explicit VR, byte order, deflated, encapsulated pixel data) are pydicom's knowledge
(`pydicom.uid.UID`) and are read from there, not typed again here; the wire layer's Pixel Data scan
(wire/pixel_scan.py) asks pydicom directly, because it also follows syntaxes outside this table. A
row holds only what pydicom does not know: how ingest checks the pixel data before it answers,
whether the syntax is lossy, how make-dicom writes it, and a note for the statement.

Adding a transfer syntax: one row here, then `python -m services.ingest.tools.conformance_doc`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pydicom.uid import UID


class PixelCheck(enum.StrEnum):
    """How validate.py checks an instance's pixel data before the C-STORE is answered."""

    LENGTH = "length"  # native pixel data: its length against Rows x Columns x Frames x Samples x Bits
    JPEG = "jpeg"  # each frame's JPEG / JPEG-LS markers and frame header against the image attributes
    J2K = "j2k"  # each frame's JPEG 2000 SOC/SIZ against the image attributes
    RLE = "rle"  # each frame's RLE segment table
    DECODE = "decode"  # no structural probe: every frame is decoded (pydicom + pylibjpeg)


class Lossy(enum.StrEnum):
    NO = "no"
    YES = "yes"
    EITHER = "lossy or lossless"


class Encoder(enum.StrEnum):
    """How make-dicom writes pixel data in a syntax."""

    PYDICOM = "pydicom"  # native: pydicom writes the data set in the syntax
    PILLOW = "pillow"  # a JPEG baseline stream by Pillow, encapsulated by pydicom
    COMPRESS = "compress"  # pydicom's Dataset.compress (pylibjpeg-rle, pylibjpeg-openjpeg)
    DCMTK = "dcmtk"  # a dcmtk tool: `args` is the command and its options


@dataclass(frozen=True)
class Recipe:
    """make-dicom's way to write a syntax: `pneumotriage make-dicom --transfer-syntax NAME`."""

    name: str
    encoder: Encoder
    args: tuple[str, ...] = ()  # Encoder.DCMTK: the command (in /usr/bin) and its options
    lossy: bool = False  # the stream written is lossy (recorded in the Lossy Image Compression attributes)
    bits: tuple[int, ...] = (8, 12, 16)  # the Bits Stored it can carry


@dataclass(frozen=True)
class TransferSyntax:
    uid: str
    check: PixelCheck
    lossy: Lossy = Lossy.NO
    lossy_method: str = ""  # Lossy Image Compression Method (PS3.3 C.7.6.1.1.5, CID 7013) when lossy
    make_dicom: Recipe | None = None  # None: make-dicom cannot write it (other toolkits' files test it)
    note: str = ""

    @property
    def pydicom_uid(self) -> UID:
        """The UID as pydicom's `UID`, which knows the syntax's name and encoding. pydicom is imported
        here, not with this module: `pneumotriage --help` reads the table (make-dicom's choices)."""
        from pydicom.uid import UID

        return UID(self.uid)

    @property
    def name(self) -> str:
        uid = self.pydicom_uid
        return f"{uid.name} (retired)" if uid.is_retired else uid.name


# In our order of preference: for each presentation context the SCP accepts the first of these that
# the requestor also proposed (docs/dicom-conformance.md section 3).
TRANSFER_SYNTAXES: tuple[TransferSyntax, ...] = (
    TransferSyntax(
        "1.2.840.10008.1.2.1",  # ExplicitVRLittleEndian
        PixelCheck.LENGTH,
        make_dicom=Recipe("explicit", Encoder.PYDICOM),
        note="chosen first when proposed",
    ),
    TransferSyntax(
        "1.2.840.10008.1.2",  # ImplicitVRLittleEndian
        PixelCheck.LENGTH,
        make_dicom=Recipe("implicit", Encoder.PYDICOM),
        note="the DICOM default syntax",
    ),
    TransferSyntax(
        "1.2.840.10008.1.2.1.99",  # DeflatedExplicitVRLittleEndian
        PixelCheck.LENGTH,
        make_dicom=Recipe("deflate", Encoder.PYDICOM),
        note="read whole (inflated) before the checks",
    ),
    TransferSyntax(
        "1.2.840.10008.1.2.4.50",  # JPEGBaseline8Bit
        PixelCheck.JPEG,
        Lossy.YES,
        "ISO_10918_1",
        make_dicom=Recipe("jpeg-baseline", Encoder.PILLOW, lossy=True, bits=(8,)),
        note="8 bit",
    ),
    TransferSyntax(
        "1.2.840.10008.1.2.4.57",  # JPEGLossless
        PixelCheck.JPEG,
        make_dicom=Recipe("jpeg-lossless-14", Encoder.DCMTK, ("dcmcjpeg", "+el", "+sv", "6")),
    ),
    TransferSyntax(
        "1.2.840.10008.1.2.4.70",  # JPEGLosslessSV1
        PixelCheck.JPEG,
        make_dicom=Recipe("jpeg-lossless", Encoder.DCMTK, ("dcmcjpeg", "+e1")),
    ),
    TransferSyntax(
        "1.2.840.10008.1.2.4.90",  # JPEG2000Lossless
        PixelCheck.J2K,
        make_dicom=Recipe("jpeg2000", Encoder.COMPRESS),
    ),
    TransferSyntax(
        "1.2.840.10008.1.2.4.91",  # JPEG2000
        PixelCheck.J2K,
        Lossy.EITHER,
        "ISO_15444_1",
        make_dicom=Recipe("jpeg2000-lossy", Encoder.COMPRESS, lossy=True),
    ),
    TransferSyntax(
        "1.2.840.10008.1.2.5",  # RLELossless
        PixelCheck.RLE,
        make_dicom=Recipe("rle", Encoder.COMPRESS),
    ),
    # What PACS and modalities also send; pylibjpeg-libjpeg decodes them. make-dicom does not write
    # them: tests/integration/test_ingest_other_toolkits.py sends dcmtk's and pydicom's files.
    TransferSyntax(
        "1.2.840.10008.1.2.4.51",  # JPEGExtended12Bit
        PixelCheck.JPEG,
        Lossy.YES,
        "ISO_10918_1",
        note="8 or 12 bit",
    ),
    TransferSyntax("1.2.840.10008.1.2.4.80", PixelCheck.JPEG),  # JPEGLSLossless
    TransferSyntax("1.2.840.10008.1.2.4.81", PixelCheck.JPEG, Lossy.YES, "ISO_14495_1"),  # JPEGLSNearLossless
    # Retired in DICOM, still sent by old devices; pydicom reads it natively.
    TransferSyntax("1.2.840.10008.1.2.2", PixelCheck.LENGTH, note="see below"),  # ExplicitVRBigEndian
)

BY_UID: dict[str, TransferSyntax] = {ts.uid: ts for ts in TRANSFER_SYNTAXES}
# The SCP's transfer syntaxes for every storage presentation context, in order of preference.
ACCEPTED: tuple[str, ...] = tuple(ts.uid for ts in TRANSFER_SYNTAXES)
# make-dicom's --transfer-syntax choices, in table order: NAME -> (row, recipe).
RECIPES: dict[str, tuple[TransferSyntax, Recipe]] = {
    ts.make_dicom.name: (ts, ts.make_dicom) for ts in TRANSFER_SYNTAXES if ts.make_dicom is not None
}


def checked_by(check: PixelCheck) -> frozenset[str]:
    """The UIDs whose pixel data validate.py checks this way."""
    return frozenset(ts.uid for ts in TRANSFER_SYNTAXES if ts.check is check)
