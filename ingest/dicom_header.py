"""Header-only reading of explicit VR little endian DICOM, without pydicom.

The RSNA files (JPEG Baseline, explicit VR little endian) need only a dozen header elements
and the position of their one JPEG frame. Walking the elements by hand costs tens of
microseconds where ``pydicom.dcmread`` costs about a millisecond. The walker is deliberately
narrow: anything it does not follow exactly (implicit VR, an element running past the end
of the file, a multi-valued or non-ASCII text value, an odd pixel data layout) makes it
return ``None``, and the caller parses the file with pydicom as before, so every unusual
file is judged by the same code as ever.

The same walker reads the first elements of an inflated Deflated Explicit VR dataset, so the
ingest learns a file's geometry before inflating its pixels.
"""

from __future__ import annotations

import dataclasses
import re
import struct

PIXEL_DATA = 0x7FE00010
ITEM, ITEM_END, SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
UNDEFINED = 0xFFFFFFFF

MEDIA_STORAGE_SOP_CLASS_UID = 0x00020002
TRANSFER_SYNTAX_UID = 0x00020010
SPECIFIC_CHARACTER_SET = 0x00080005
SOP_CLASS_UID = 0x00080016
PATIENT_ID = 0x00100020
PATIENT_SEX = 0x00100040
PATIENT_AGE = 0x00101010
BODY_PART_EXAMINED = 0x00180015
VIEW_POSITION = 0x00185101
SAMPLES_PER_PIXEL = 0x00280002
PHOTOMETRIC = 0x00280004
NUMBER_OF_FRAMES = 0x00280008
ROWS = 0x00280010
COLUMNS = 0x00280011
BITS_ALLOCATED = 0x00280100
WINDOW_CENTER = 0x00281050
RESCALE_INTERCEPT = 0x00281052
RESCALE_SLOPE = 0x00281053
BURNED_IN_ANNOTATION = 0x00280301
MODALITY_LUT_SEQUENCE = 0x00283000
VOI_LUT_SEQUENCE = 0x00283010

# Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ SV UC UN UR UT UV".split())
_SHORT_VRS = frozenset(b"AE AS AT CS DA DS DT FL FD IS LO LT PN SH SL SS ST TM UI UL US".split())
_US_TAGS = frozenset((SAMPLES_PER_PIXEL, ROWS, COLUMNS, BITS_ALLOCATED))
_HEAD = struct.Struct("<HH2sH")  # group, element, VR, short length
_U32 = struct.Struct("<I")
_TEXT_VR = {
    MEDIA_STORAGE_SOP_CLASS_UID: b"UI", TRANSFER_SYNTAX_UID: b"UI", SPECIFIC_CHARACTER_SET: b"CS", SOP_CLASS_UID: b"UI",
    PATIENT_ID: b"LO", PATIENT_SEX: b"CS", PATIENT_AGE: b"AS", BODY_PART_EXAMINED: b"CS", VIEW_POSITION: b"CS",
    PHOTOMETRIC: b"CS", NUMBER_OF_FRAMES: b"IS", BURNED_IN_ANNOTATION: b"CS",
}
_WANTED = _US_TAGS | frozenset(_TEXT_VR)
_PLAIN_ASCII = re.compile(rb"[\x00\x20-\x5b\x5d-\x7e]*")  # printable ASCII but the value separator, NUL padding


class HeaderIncomplete(Exception):
    """The buffer ends inside the header (read more, or the file is truncated)."""


class Unfollowed(Exception):
    """Something the walker does not follow; the caller falls back to pydicom."""


@dataclasses.dataclass(frozen=True)
class Header:
    """Top-level elements of one dataset, up to and including where its pixel data starts."""

    values: dict[int, int | str]
    """Decoded values of the elements named above (US as int, text as stripped str)."""
    present: frozenset[int]
    """Tags of every top-level element seen."""
    pixel_data: tuple[int, int] | None
    """(offset of the value, length or UNDEFINED) of PixelData; None if the dataset has none."""
    end: int
    """Offset just past the last element walked."""


def _value(tag: int, vr: bytes, raw: bytes) -> int | str:
    if tag in _US_TAGS:
        if vr != b"US" or len(raw) != 2:
            raise Unfollowed(f"{tag:08X} is {vr!r} of {len(raw)} bytes")
        return struct.unpack("<H", raw)[0]
    if vr != _TEXT_VR[tag]:
        raise Unfollowed(f"{tag:08X} is {vr!r}")
    if not _PLAIN_ASCII.fullmatch(raw):
        raise Unfollowed(f"{tag:08X} is not a single plain ASCII value")
    return raw.decode("ascii").strip(" \x00")


def _skip_undefined(buf: bytes | bytearray, pos: int, until: int) -> int:
    """Offset past the delimiter ``until`` of an undefined-length value starting at ``pos``."""
    while True:
        if pos + 8 > len(buf):
            raise HeaderIncomplete("undefined-length value runs past the end")
        tag = (struct.unpack_from("<H", buf, pos)[0] << 16) | struct.unpack_from("<H", buf, pos + 2)[0]
        if tag == until:
            return pos + 8
        if tag == ITEM:
            length = struct.unpack_from("<I", buf, pos + 4)[0]
            pos = _skip_undefined(buf, pos + 8, ITEM_END) if length == UNDEFINED else pos + 8 + length
            continue
        if until == SEQUENCE_END:
            raise Unfollowed(f"tag {tag:08X} inside a sequence, outside an item")
        pos = _element_end(buf, pos, tag)[2]


def _element_end(buf: bytes | bytearray, pos: int, tag: int) -> tuple[bytes, int, int]:
    """(VR, value offset, offset past the value) of the explicit VR element at ``pos``."""
    if pos + 8 > len(buf):
        raise HeaderIncomplete("element header runs past the end")
    vr = bytes(buf[pos + 4 : pos + 6])
    if vr in _LONG_VRS:
        if pos + 12 > len(buf):
            raise HeaderIncomplete("element header runs past the end")
        length, start = struct.unpack_from("<I", buf, pos + 8)[0], pos + 12
    elif vr in _SHORT_VRS:
        length, start = struct.unpack_from("<H", buf, pos + 6)[0], pos + 8
    else:
        raise Unfollowed(f"no explicit VR at {pos} (tag {tag:08X})")
    if length == UNDEFINED:
        if vr not in (b"SQ", b"UN"):
            raise Unfollowed(f"undefined length on {vr!r} (tag {tag:08X})")
        return vr, start, _skip_undefined(buf, start, SEQUENCE_END)
    return vr, start, start + length


def walk(buf: bytes | bytearray, pos: int, *, group: int | None = None) -> Header:
    """Walk the top-level elements of an explicit VR little endian dataset from ``pos``.

    Stops at PixelData (whose value is not read), at the end of ``buf``, or, with ``group``,
    at the first element of another group (the file meta is group 2).

    Raises:
        HeaderIncomplete: an element runs past the end of ``buf``.
        Unfollowed: anything the walker does not follow.
    """
    values: dict[int, int | str] = {}
    present: list[int] = []
    end = len(buf)
    while pos < end:
        if pos + 8 > end:
            raise HeaderIncomplete("element header runs past the end")
        g, e, vr, short = _HEAD.unpack_from(buf, pos)  # one call: this loop is the fast path's cost
        if group is not None and g != group:
            break
        tag = (g << 16) | e
        if tag == PIXEL_DATA:
            if vr not in (b"OB", b"OW") or pos + 12 > end:
                raise Unfollowed(f"PixelData with VR {vr!r}")
            present.append(tag)
            return Header(values, frozenset(present), (pos + 12, _U32.unpack_from(buf, pos + 8)[0]), pos + 12)
        if vr in _SHORT_VRS:
            start, nxt = pos + 8, pos + 8 + short
        else:
            vr, start, nxt = _element_end(buf, pos, tag)
        if nxt > end:
            raise HeaderIncomplete(f"element {tag:08X} runs past the end")
        if tag in _WANTED:
            values[tag] = _value(tag, vr, bytes(buf[start:nxt]))
        present.append(tag)
        pos = nxt
    return Header(values, frozenset(present), None, pos)


def read_meta(data: bytes) -> tuple[Header, int]:
    """The file meta group (2) after the preamble; returns it and where the dataset starts."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise Unfollowed("no preamble")
    meta = walk(data, 132, group=2)
    return meta, meta.end


def encapsulated_frame(data: bytes, offset: int) -> bytes:
    """The single frame of encapsulated pixel data whose first item starts at ``offset``.

    The first item is the basic offset table; the frame is every fragment after it, joined
    (as pydicom's ``generate_frames`` does for one frame), up to the sequence delimiter.
    """
    fragments: list[bytes] = []
    pos, first = offset, True
    while True:
        if pos + 8 > len(data):
            raise Unfollowed("encapsulated pixel data without a sequence delimiter")
        tag = (struct.unpack_from("<H", data, pos)[0] << 16) | struct.unpack_from("<H", data, pos + 2)[0]
        length = struct.unpack_from("<I", data, pos + 4)[0]
        if tag == SEQUENCE_END:
            break
        if tag != ITEM or length == UNDEFINED or pos + 8 + length > len(data):
            raise Unfollowed("odd or truncated fragment")
        if not first:
            fragments.append(data[pos + 8 : pos + 8 + length])
        first, pos = False, pos + 8 + length
    if not fragments:
        raise Unfollowed("no fragment after the offset table")
    return fragments[0] if len(fragments) == 1 else b"".join(fragments)
