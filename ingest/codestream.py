"""What a compressed frame says about itself, read before any pixel is decoded, and strict
JPEG decoding.

* :func:`frame_geometry` reads the image size from the codestream header (a JPEG or JPEG-LS
  SOF segment, a JPEG 2000 SIZ segment), so a frame whose header disagrees with the DICOM
  Rows/Columns, or that is too large, is rejected before a decoder allocates its pixels.
* :func:`decode_jpeg` decodes a JPEG (8-bit, Huffman) frame with libjpeg-turbo through
  ``simplejpeg`` with ``strict=True``: libjpeg's "corrupt data" warnings, which OpenCV and
  Pillow only print to stderr, become a :class:`CorruptPixelData` carrying the decoder's
  message. ``min_shape`` decodes in the DCT domain at the smallest n/8 scale that still
  covers the wanted shape (1024 -> 640 is exactly 5/8).
* :func:`check_jpeg` runs the same strict decode at 1/8 scale, cheaply, for the frames the
  general (pydicom) path decodes with decoders that do not report corrupt data.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import simplejpeg
from pydicom.uid import JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes

# Start-of-frame markers of every JPEG process (ITU T.81 B.1.1.3), plus JPEG-LS's SOF55.
_SOF = frozenset((0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF, 0xF7))
_STANDALONE = frozenset((0x01, *range(0xD0, 0xD8)))  # TEM and RSTn carry no length
_EOI = b"\xff\xd9"  # JPEG EOI; JPEG 2000's EOC has the same two bytes


class CorruptPixelData(Exception):
    """A compressed frame that is damaged, truncated or not the codestream it claims to be."""


@dataclasses.dataclass(frozen=True)
class FrameGeometry:
    """Image size and layout as the codestream header states them."""

    rows: int
    cols: int
    components: int
    precision: int
    kind: str
    """``jpeg`` (any ISO 10918 process), ``jpeg-ls`` or ``jpeg2000``."""
    marker: int = 0
    """The JPEG SOF marker (0xC0 baseline, 0xC1 extended, ...); 0 for JPEG 2000."""


def _jpeg_sof(frame: bytes) -> FrameGeometry:
    if frame[:2] != b"\xff\xd8":
        raise CorruptPixelData("JPEG frame does not start with SOI (FFD8)")
    pos, n = 2, len(frame)
    while pos + 4 <= n:
        if frame[pos] != 0xFF:
            raise CorruptPixelData(f"JPEG header: no marker at byte {pos}")
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        (length,) = struct.unpack_from(">H", frame, pos + 2)
        if marker in _SOF:
            if pos + 10 > n:
                break
            precision, rows, cols, comps = struct.unpack_from(">BHHB", frame, pos + 4)
            return FrameGeometry(rows, cols, comps, precision, "jpeg-ls" if marker == 0xF7 else "jpeg", marker)
        if marker in (0xDA, 0xD9):  # SOS or EOI before any SOF
            break
        pos += 2 + length
    raise CorruptPixelData("JPEG header has no start-of-frame (SOF) segment")


def _j2k_siz(frame: bytes) -> FrameGeometry:
    # A bare codestream starts with SOC (FF4F) then SIZ (FF51); some writers wrap it in a JP2
    # file, whose codestream box holds the same two markers further in.
    at = 0 if frame[:4] == b"\xff\x4f\xff\x51" else frame.find(b"\xff\x4f\xff\x51", 0, 4096)
    if at < 0 or at + 42 > len(frame):
        raise CorruptPixelData("JPEG 2000 frame has no SOC + SIZ header")
    xsiz, ysiz, xo, yo = struct.unpack_from(">IIII", frame, at + 8)
    (csiz,) = struct.unpack_from(">H", frame, at + 40)
    precision = (frame[at + 42] & 0x7F) + 1 if at + 43 <= len(frame) else 0
    if xsiz <= xo or ysiz <= yo:
        raise CorruptPixelData(f"JPEG 2000 SIZ: image area {xsiz}x{ysiz} at offset {xo},{yo} is empty")
    return FrameGeometry(ysiz - yo, xsiz - xo, csiz, precision, "jpeg2000")


def frame_geometry(frame: bytes, transfer_syntax: str) -> FrameGeometry | None:
    """The size a compressed frame declares, or None for codestreams without a size header
    (RLE: its size comes from Rows/Columns alone).

    Raises:
        CorruptPixelData: the frame is not the codestream its transfer syntax names.
    """
    if transfer_syntax in JPEG2000TransferSyntaxes:
        return _j2k_siz(frame)
    if transfer_syntax in JPEGTransferSyntaxes or transfer_syntax in JPEGLSTransferSyntaxes:
        return _jpeg_sof(frame)
    return None


def check_end_marker(frame: bytes) -> bool:
    """True if a JPEG/JPEG-LS/JPEG 2000 frame ends with EOI/EOC (a DICOM fragment may add one
    byte of padding to reach an even length)."""
    return _EOI in frame[-4:]


def _decode(frame: bytes, colorspace: str, min_shape: tuple[int, int] | None) -> np.ndarray:
    h, w = min_shape or (0, 0)
    try:
        return simplejpeg.decode_jpeg(frame, colorspace=colorspace, min_height=h, min_width=w, strict=True)
    except ValueError as exc:  # simplejpeg's one exception type: libjpeg's message
        raise CorruptPixelData(str(exc).strip() or "libjpeg-turbo refused the frame") from exc


def decode_jpeg(frame: bytes, min_shape: tuple[int, int] | None = None) -> np.ndarray:
    """Strictly decode a greyscale 8-bit JPEG frame to uint8 (rows, cols).

    Args:
        frame: The JPEG codestream.
        min_shape: Decode at the smallest n/8 scale (n = 1..8) whose (rows, cols) are both at
            least this; None decodes at full size (the same pixels as OpenCV's ``imdecode``).

    Raises:
        CorruptPixelData: a damaged or truncated stream (with libjpeg's message).
    """
    out = _decode(frame, "GRAY", min_shape)
    return out[..., 0] if out.ndim == 3 else out


def check_jpeg(frame: bytes, geometry: FrameGeometry) -> None:
    """Strictly decode an 8-bit Huffman JPEG frame at 1/8 scale and throw the pixels away.

    The entropy-coded data is read in full at any scale, so every corrupt-data warning still
    fires, for about a quarter of a full decode. Frames libjpeg-turbo cannot take (12-bit,
    lossless, JPEG-LS) are left to their decoders.

    Raises:
        CorruptPixelData: a damaged or truncated stream.
    """
    if geometry.kind != "jpeg" or geometry.precision != 8 or geometry.marker not in (0xC0, 0xC1, 0xC2):
        return
    if geometry.components not in (1, 3):
        return
    _decode(frame, "GRAY" if geometry.components == 1 else "RGB", (1, 1))
