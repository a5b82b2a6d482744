"""The few DIMSE command sets the fast path reads and writes by hand (group 0000, implicit VR little
endian): the fields of a request, and a C-STORE-RSP. Both are proven byte for byte against
pynetdicom's own codec (tests/unit/test_ingest_wire.py)."""

from __future__ import annotations

import struct

C_STORE_RQ = 0x0001
NO_DATASET = 0x0101
# Command Field values of PS3.7 Annex E (requests, responses and C-CANCEL): anything else is refused
# before pynetdicom sees it (its decoder has no class for it and raises on the network thread).
KNOWN_COMMANDS = frozenset(
    {0x0001, 0x8001, 0x0010, 0x8010, 0x0020, 0x8020, 0x0021, 0x8021, 0x0030, 0x8030, 0x0FFF}
    | {0x0100, 0x8100, 0x0110, 0x8110, 0x0120, 0x8120, 0x0130, 0x8130, 0x0140, 0x8140, 0x0150, 0x8150}
)


def command_fields(raw: bytes) -> dict[int, int | str] | None:
    """The few command elements we need, from an encoded command set (group 0000, implicit VR
    little endian): CommandField (0100), MessageID (0110), Priority (0700, the lane rules read it),
    CommandDataSetType (0800) as numbers,
    Affected SOP Class (0002) and Instance (1000) UIDs as text. None when the bytes are not a
    command set."""
    out: dict[int, int | str] = {}
    pos = 0
    while pos + 8 <= len(raw):
        group, elem, length = struct.unpack_from("<HHL", raw, pos)
        pos += 8
        if group != 0x0000 or pos + length > len(raw):
            return None
        value = raw[pos : pos + length]
        pos += length
        if elem in (0x0100, 0x0110, 0x0700, 0x0800) and length == 2:
            out[elem] = struct.unpack("<H", value)[0]
        elif elem in (0x0002, 0x1000):
            out[elem] = value.rstrip(b"\x00 ").decode("ascii", "replace")
    return out if pos == len(raw) else None


def _command_element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHL", 0x0000, elem, len(value)) + value


def c_store_rsp_command(
    message_id: int, sop_class_uid: str, sop_instance_uid: str, status: int, error_comment: str = ""
) -> bytes:
    """The command set of a C-STORE-RSP (group 0000, implicit VR little endian), encoded directly:
    the same bytes as pynetdicom's C_STORE_RSP encoder (tests/unit/test_ingest_wire.py), ~20x
    cheaper than building it through a pydicom dataset."""

    def uid(value: str) -> bytes:
        raw = value.encode("ascii")
        return raw + b"\x00" if len(raw) % 2 else raw

    body = b"".join(
        (
            _command_element(0x0002, uid(sop_class_uid)),
            _command_element(0x0100, struct.pack("<H", 0x8001)),
            _command_element(0x0120, struct.pack("<H", message_id)),
            _command_element(0x0800, struct.pack("<H", NO_DATASET)),
            _command_element(0x0900, struct.pack("<H", status)),
        )
    )
    if error_comment:
        comment = error_comment.encode("ascii", "replace")[:64]
        body += _command_element(0x0902, comment + b" " if len(comment) % 2 else comment)
    body += _command_element(0x1000, uid(sop_instance_uid))
    return _command_element(0x0000, struct.pack("<L", len(body))) + body
