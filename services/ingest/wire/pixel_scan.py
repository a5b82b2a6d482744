"""The Pixel Data element's declared length, read incrementally from the first bytes of a data set,
so that an instance declaring more than the per-instance limit is refused at its header."""

from __future__ import annotations

import struct

from pydicom.uid import UID

SCAN_LIMIT = 1 << 20  # the Pixel Data header is looked for in this many first bytes of a data set
PIXEL_DATA_TAG = (0x7FE0, 0x0010)
UNDEFINED = 0xFFFFFFFF
LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})


class _Unscannable(Exception):
    """The data set does not parse as its transfer syntax says (pydicom may still read it): stop looking."""


def _skip_undefined(buf: bytes, pos: int, implicit: bool, depth: int) -> int | None:
    """End offset of an undefined-length sequence value starting at pos; None if buf ends first."""
    if depth > 16:
        raise _Unscannable("sequences nested too deeply")
    while True:
        if pos + 8 > len(buf):
            return None
        group, elem, length = struct.unpack_from("<HHL", buf, pos)
        pos += 8
        if (group, elem) == (0xFFFE, 0xE0DD):  # sequence delimitation
            return pos
        if (group, elem) != (0xFFFE, 0xE000):
            raise _Unscannable("malformed sequence item")
        if length != UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: its elements up to the item delimitation
            if pos + 8 > len(buf):
                return None
            group, elem = struct.unpack_from("<HH", buf, pos)
            if (group, elem) == (0xFFFE, 0xE00D):
                pos += 8
                break
            step = _element_end(buf, pos, implicit, depth + 1)
            if step is None:
                return None
            pos = step[0]


def _element_end(buf: bytes, pos: int, implicit: bool, depth: int) -> tuple[int, tuple[int, int], int] | None:
    """(end offset, tag, declared length) of the element at pos; None if buf ends first."""
    if pos + 8 > len(buf):
        return None
    group, elem = struct.unpack_from("<HH", buf, pos)
    if implicit or group == 0xFFFE:
        (length,) = struct.unpack_from("<L", buf, pos + 4)
        start, is_sq = pos + 8, length == UNDEFINED
    else:
        vr = bytes(buf[pos + 4 : pos + 6])
        if not (65 <= vr[0] <= 90 and 65 <= vr[1] <= 90):
            raise _Unscannable("not explicit VR")  # e.g. implicit VR under an explicit VR syntax
        if vr in LONG_VRS:
            if pos + 12 > len(buf):
                return None
            (length,) = struct.unpack_from("<L", buf, pos + 8)
            start = pos + 12
        else:
            (length,) = struct.unpack_from("<H", buf, pos + 6)
            start = pos + 8
        is_sq = length == UNDEFINED
    if (group, elem) == PIXEL_DATA_TAG:
        return start, (group, elem), length  # its value is not needed: the header says enough
    if is_sq:
        end = _skip_undefined(buf, start, implicit, depth)
        return None if end is None else (end, (group, elem), length)
    return start + length, (group, elem), length


class PixelLengthScan:
    """Finds the Pixel Data element's declared length in the first bytes of a data set, incrementally."""

    def __init__(self, transfer_syntax: str) -> None:
        # the syntax's encoding from pydicom, as services/ingest/transfer_syntaxes.py reads it (this scan
        # also follows syntaxes outside that table: tests feed it pydicom's test files)
        syntax = UID(transfer_syntax)
        self.implicit = syntax.is_implicit_VR
        self.active = not syntax.is_deflated
        self.buf = bytearray()
        self.pos = 0

    def feed(self, data: bytes | memoryview) -> int | None:
        """The declared Pixel Data length once seen (UNDEFINED for encapsulated data), else None."""
        if not self.active:
            return None
        self.buf += data
        while True:
            try:
                step = _element_end(self.buf, self.pos, self.implicit, 0)
            except _Unscannable:
                self.active, self.buf = False, bytearray()  # the byte cap still applies
                return None
            if step is None:
                if len(self.buf) >= SCAN_LIMIT:
                    self.active, self.buf = False, bytearray()  # not in the first MiB: the byte cap rules
                return None
            end, tag, length = step
            if tag == PIXEL_DATA_TAG:
                self.active, self.buf = False, bytearray()
                return length
            if tag[0] > PIXEL_DATA_TAG[0]:
                self.active, self.buf = False, bytearray()
                return None
            self.pos = end
