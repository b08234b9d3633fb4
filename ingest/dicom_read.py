"""Reading a DICOM file's bytes into a pydicom dataset without trusting them, and the reject
(:class:`DicomRejected`) every failure to read or decode a file becomes.

A Deflated Explicit VR file is inflated in steps, no further than its header declares; every
size is checked against ``max_pixels`` before pixels are decoded or inflated.
"""

from __future__ import annotations

import contextlib
import io
import struct
import warnings
import zlib
from collections.abc import Callable, Iterator

import pydicom
import pydicom.config
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian

from ingest import dicom_header
from shards.manifest import DEFAULT_MAX_PIXELS

REASONS = {
    "not_dicom": "not a DICOM file (no 'DICM' preamble, or unparseable header)",
    "truncated": "the file ends before its pixel data does",
    "no_pixel_data": "the dataset has no PixelData element",
    "multi_frame": "more than one frame; this pipeline takes single radiographs",
    "bad_geometry": "Rows/Columns missing, zero or inconsistent with the pixels or the codestream header",
    "too_large": "more pixels than --max-pixels; rejected before they are decoded or inflated",
    "unsupported_transfer_syntax": "no installed decoder handles this transfer syntax",
    "corrupt_pixel_data": "the compressed pixel data is damaged or truncated (the decoder's message)",
    "decode_error": "reading, parsing or decoding the file raised an error (its type and message)",
    "unsupported_photometric": "photometric interpretation this pipeline cannot convert",
}
"""Reject reasons of reading and decoding a file, with what they mean (:data:`ingest.dicom.REASONS` adds the SOP-class ones)."""

DETAIL_CHARS = 300
_INFLATE_CHUNK = 1 << 20
_HEADER_INFLATE_LIMIT = 64 << 20  # a header larger than this is not a radiograph's
_TRAILER_SLACK = 1 << 20  # elements after the pixel data (padding, signatures)
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian


class DicomRejected(Exception):
    """A file that cannot become a sample; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception on one line, cut to a readable length."""
    msg = " ".join(str(exc).split())
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return text if len(text) <= DETAIL_CHARS else text[: DETAIL_CHARS - 3] + "..."


@contextlib.contextmanager
def lenient_values() -> Iterator[None]:
    """pydicom's value validation off while a file's values are read: RSNA's PatientAge ('43')
    is not a conformant AS value (:func:`ingest.dicom.parse_age` reads it), and a file's odd value is its
    own concern, not a warning per file. pydicom's setting is process-wide, so it is restored
    on the way out, as pydicom's own ``disable_value_validation`` does."""
    settings = pydicom.config.settings
    before = settings.reading_validation_mode
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.reading_validation_mode = before


def _parse(read: Callable[[], pydicom.Dataset]) -> pydicom.Dataset:
    """Run a pydicom read, mapping its failures and end-of-file warnings onto rejects."""
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = read()
    except InvalidDicomError as exc:
        raise DicomRejected("not_dicom", str(exc)) from exc
    except (EOFError, struct.error, OverflowError) as exc:
        raise DicomRejected("truncated", f"header ends early ({exc})") from exc
    except Exception as exc:  # pydicom raises many types on a garbled header
        raise DicomRejected("not_dicom", f"unparseable header ({describe(exc)})") from exc
    ended_early = [str(w.message) for w in caught if "End of file reached" in str(w.message)]
    if ended_early:
        raise DicomRejected("truncated", ended_early[0])
    return ds


def read_header(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> pydicom.Dataset:
    """Parse a whole DICOM file held in memory; reject non-DICOM and truncated headers.

    A Deflated Explicit VR file is inflated here, in steps: its header first, then no more
    than the pixel data that header declares, so a small file cannot inflate into gigabytes.
    """
    if len(data) < 132 or data[128:132] != b"DICM":
        raise DicomRejected("not_dicom", "no 'DICM' marker at byte 128")
    try:
        meta, body_at = dicom_header.read_meta(data)
        deflated = meta.values.get(dicom_header.TRANSFER_SYNTAX_UID) == DeflatedExplicitVRLittleEndian
    except (dicom_header.Unfollowed, dicom_header.HeaderIncomplete, struct.error, RecursionError):
        if DeflatedExplicitVRLittleEndian.encode() in data[132:4096]:
            # pydicom would inflate the whole dataset unbounded: no bounded reading, no decoding
            raise DicomRejected("not_dicom", "Deflated Explicit VR file with a file meta group the bounded reader cannot follow") from None
        deflated = False  # pydicom judges the meta
    if deflated:
        body = _inflate_bounded(data[body_at:], max_pixels)

        def read() -> pydicom.Dataset:
            file_meta = FileMetaDataset(read_dataset(io.BytesIO(data[132:body_at]), False, True))
            dataset = read_dataset(DicomBytesIO(body), False, True)
            return FileDataset(io.BytesIO(b""), dataset, data[:128], file_meta, False, True)

        ds = _parse(read)
        raw = body
    else:
        ds = _parse(lambda: pydicom.dcmread(io.BytesIO(data)))
        raw = data
    if "PixelData" not in ds and _PIXEL_DATA_TAG in raw:
        raise DicomRejected("truncated", "PixelData (7FE0,0010) element is cut short")
    return ds


def _inflate_bounded(zipped: bytes, max_pixels: int) -> bytes:
    """Inflate a deflated dataset, refusing to produce more than its header declares."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    pending = [zipped]  # the input not yet consumed

    def more(limit: int) -> bytes:
        try:
            chunk = d.decompress(pending[0], limit)
        except zlib.error as exc:
            raise DicomRejected("corrupt_pixel_data", f"deflated dataset is damaged (zlib: {exc})") from exc
        pending[0] = d.unconsumed_tail
        return chunk

    out = bytearray(more(_INFLATE_CHUNK))
    limit: int | None = None
    while limit is None:
        try:
            header = dicom_header.walk(out, 0)
            if header.pixel_data is not None:
                limit = _declared_end(header, max_pixels)
            elif d.eof or len(out) >= _HEADER_INFLATE_LIMIT:
                limit = _HEADER_INFLATE_LIMIT
        except (dicom_header.Unfollowed, struct.error, RecursionError):
            limit = _HEADER_INFLATE_LIMIT + 8 * max_pixels  # 16-bit RGB and then some
        except dicom_header.HeaderIncomplete:
            if d.eof or len(out) >= _HEADER_INFLATE_LIMIT:
                limit = _HEADER_INFLATE_LIMIT + 8 * max_pixels
        if limit is None:
            chunk = more(_INFLATE_CHUNK)
            if not chunk:
                break  # the deflate stream ends early: pydicom reports the truncation
            out += chunk
    while limit is not None and not d.eof:
        chunk = more(limit + 1 - len(out))
        if not chunk:
            break
        out += chunk
        if len(out) > limit:
            raise DicomRejected("too_large", f"deflated dataset inflates past the {limit:,} bytes its header declares")
    return bytes(out)


def _declared_end(header: dicom_header.Header, max_pixels: int) -> int:
    """Where a dataset's bytes should end, from its header's geometry (too_large if too many)."""
    v = header.values
    rows, cols = int(v.get(dicom_header.ROWS, 0)), int(v.get(dicom_header.COLUMNS, 0))
    frames_text = str(v.get(dicom_header.NUMBER_OF_FRAMES, "") or "1")
    frames = int(frames_text) if frames_text.isdigit() else 1
    check_size(rows, cols * max(frames, 1), max_pixels)
    sample_bytes = int(v.get(dicom_header.SAMPLES_PER_PIXEL, 1)) * max(1, -(-int(v.get(dicom_header.BITS_ALLOCATED, 16)) // 8))
    assert header.pixel_data is not None
    return header.pixel_data[0] + rows * cols * max(frames, 1) * sample_bytes + _TRAILER_SLACK


def check_size(rows: int, cols: int, max_pixels: int) -> None:
    if rows * cols > max_pixels:
        raise DicomRejected("too_large", f"{cols}x{rows} = {rows * cols:,} pixels > --max-pixels {max_pixels:,}")
