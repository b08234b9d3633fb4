"""DICOM decoding to an 8-bit greyscale image, with a short way for RSNA's JPEG Baseline.

Two readers, and two decoders:

- the *raw reader* (:func:`_read_raw`) walks the header without pydicom
  (:mod:`ingest.dicom_header`) and locates the one frame; it takes a file only when the tags
  it needs are plain, and steps aside (None) otherwise. The whole RSNA set is read this way.
- the *pydicom reader* (:func:`_decode_parsed`) takes every other file.
- the *libjpeg decode* (:func:`_decode_libjpeg`) decodes a JPEG frame strictly with
  libjpeg-turbo (:mod:`ingest.codestream`), optionally at a reduced n/8 scale; either reader
  hands it the frame of a file that :func:`libjpeg_decodes` accepts (``fast_path``).
- the *general decode* (:func:`_decode_general`) goes through pydicom and its plugins, then
  Modality LUT (rescale), VOI LUT or window, and colour-to-grey.

Both readers end in :func:`_result`, which turns MONOCHROME1 into MONOCHROME2.

Before any pixel is decoded (or inflated) the image size is checked: Rows x Columns against
``max_pixels``, and a compressed frame's own header (JPEG SOF, JPEG 2000 SIZ) against
Rows/Columns. Compressed JPEG data is decoded strictly: libjpeg's corrupt-data warnings are
errors.

Every way a file can fail becomes a :class:`~ingest.dicom_read.DicomRejected` with a short
machine-readable ``reason`` (see :data:`~ingest.dicom_read.REASONS`) and a one-line human
``detail``; an exception nobody foresaw becomes ``decode_error`` with its type and message.
Reading the bytes into a pydicom dataset, bounded, is :mod:`ingest.dicom_read`'s.
"""

from __future__ import annotations

import dataclasses
import re
import struct
from collections.abc import Callable
from typing import Any

import cv2
import numpy as np
import pydicom
import pydicom.charset
import pydicom.encaps
import pydicom.pixels
from pydicom.uid import DeflatedExplicitVRLittleEndian, JPEGBaseline8Bit

from ingest import codestream, dicom_header, dicom_read, sop, transforms
from ingest.dicom_read import DETAIL_CHARS, DicomRejected, check_size, describe, lenient_values, read_header
from shards.geometry import letterbox_geometry
from shards.manifest import DEFAULT_MAX_PIXELS

__all__ = ["REASONS", "DecodedDicom", "DicomRejected", "decode_dicom", "describe", "libjpeg_decodes", "parse_age"]

REASONS = {**dicom_read.REASONS, **sop.REASONS}
"""Reject reasons raised by :func:`decode_dicom`, with what they mean."""

_LUT_TAGS = frozenset((dicom_header.WINDOW_CENTER, dicom_header.RESCALE_SLOPE, dicom_header.RESCALE_INTERCEPT, dicom_header.MODALITY_LUT_SEQUENCE, dicom_header.VOI_LUT_SEQUENCE))


@dataclasses.dataclass(frozen=True)
class DecodedDicom:
    """An image as 8-bit grey, and the header fields we keep."""

    pixels: np.ndarray
    """uint8, MONOCHROME2 sense (bright = dense); (rows, cols) unless ``resampled``."""
    rows: int
    """Source image rows (Rows), whatever scale ``pixels`` were decoded at."""
    cols: int
    """Source image columns (Columns)."""
    patient_id: str | None
    view_position: str | None
    sex: str | None
    age: int | None
    transfer_syntax: str
    fast_path: bool
    """The frame went straight to the libjpeg decode (:func:`libjpeg_decodes`), by either reader."""
    resampled: bool = False
    """``pixels`` come from a JPEG decode at a reduced n/8 scale (see ``fit``)."""
    body_part: str | None = None
    """BodyPartExamined (read for the QA flags, not kept)."""
    burned_in_annotation: str | None = None
    """BurnedInAnnotation (read for the QA flags, not kept)."""


_AGE = re.compile(r"^\s*0*(\d{1,3})\s*([YMWD]?)\s*$", re.IGNORECASE)


def parse_age(value: Any) -> int | None:
    """Age in whole years from a DICOM AS (``043Y``, ``006M``) or RSNA's bare ``43``."""
    m = _AGE.match(str(value or ""))
    if not m:
        return None
    n, unit = int(m.group(1)), m.group(2).upper()
    years = n if unit in ("", "Y") else 0
    return years if 0 <= years <= 130 else None


def _text(ds: pydicom.Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    value = str(value).strip() if value not in (None, "") else ""
    return value or None


def decode_dicom(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, fit: int | None = None, sop_classes: str | None = "radiograph"
) -> DecodedDicom:
    """Decode a DICOM file's bytes to an 8-bit greyscale image.

    Args:
        data: The whole file.
        max_pixels: Reject (``too_large``) an image of more pixels, before decoding it.
        fit: The side of the square the image will be letterboxed into. A JPEG frame the
            libjpeg decode takes is then decoded at the smallest n/8 scale that still covers the
            letterboxed size (``resampled``); None decodes at full size.
        sop_classes: Which SOP classes become samples (:func:`ingest.sop.judge`), judged
            from the header before any pixel; None judges none.

    Raises:
        DicomRejected: for anything that cannot become a single 8-bit greyscale image,
            including any unforeseen exception (``decode_error``).
    """
    try:
        raw = _read_raw(data)
        if raw is not None:
            sop.judge(raw.sop_class, sop_classes)
            return _decode_raw(raw, max_pixels, fit)
        with lenient_values():
            return _decode_parsed(data, max_pixels, fit, sop_classes)
    except DicomRejected:
        raise
    except sop.NotAccepted as exc:
        raise DicomRejected(exc.reason, exc.detail) from None
    except Exception as exc:  # a file must cost one reject, never the run
        raise DicomRejected("decode_error", describe(exc)) from exc


def libjpeg_decodes(transfer_syntax: str, photometric: str, bits_allocated: Callable[[], Any],
                    samples_per_pixel: Callable[[], Any], has_lut: Callable[[], bool]) -> bool:
    """True for a file whose frame libjpeg-turbo decodes straight to the image: 8-bit
    monochrome JPEG Baseline with no LUT, rescale or window to apply.

    Each reader passes how it reads the values; they are read in this order and only as far as
    needed (a garbled value of a file that fails an earlier test is left to the general decode).
    """
    return (
        transfer_syntax == JPEGBaseline8Bit
        and bits_allocated() == 8
        and samples_per_pixel() == 1
        and photometric in ("MONOCHROME1", "MONOCHROME2")
        and not has_lut()
    )


@dataclasses.dataclass(frozen=True)
class _RawFile:
    """What the raw reader found: the one JPEG frame and the header's values."""

    frame: bytes
    rows: int
    cols: int
    photometric: str
    values: dict[int, int | str]
    sop_class: str | None


def _read_raw(data: bytes) -> _RawFile | None:
    """The header and frame of a file :func:`libjpeg_decodes`, read without pydicom; None for
    any other file, or one whose header the raw reader does not follow."""
    try:
        meta, body_at = dicom_header.read_meta(data)
        ts = meta.values.get(dicom_header.TRANSFER_SYNTAX_UID)
        if ts != JPEGBaseline8Bit:
            return None
        header = dicom_header.walk(data, body_at)
        v = header.values
        if header.pixel_data is None or header.pixel_data[1] != dicom_header.UNDEFINED:
            return None
        if str(v.get(dicom_header.NUMBER_OF_FRAMES, "") or "1") != "1":
            return None
        if str(v.get(dicom_header.SPECIFIC_CHARACTER_SET, "") or "ISO_IR 6") not in pydicom.charset.python_encoding:
            return None  # pydicom judges an unknown character set
        photometric = str(v.get(dicom_header.PHOTOMETRIC, "")).upper()
        # Any LUT tag at all steps aside: the pydicom reader judges its values.
        if not libjpeg_decodes(ts, photometric, lambda: v.get(dicom_header.BITS_ALLOCATED),
                               lambda: v.get(dicom_header.SAMPLES_PER_PIXEL, 1), lambda: bool(header.present & _LUT_TAGS)):
            return None
        rows, cols = int(v.get(dicom_header.ROWS, 0)), int(v.get(dicom_header.COLUMNS, 0))
        if rows <= 0 or cols <= 0:
            return None
        frame = dicom_header.encapsulated_frame(data, header.pixel_data[0])
    except (dicom_header.Unfollowed, dicom_header.HeaderIncomplete, struct.error, RecursionError):
        return None
    sop_class = v.get(dicom_header.SOP_CLASS_UID) or meta.values.get(dicom_header.MEDIA_STORAGE_SOP_CLASS_UID)
    return _RawFile(frame, rows, cols, photometric, v, str(sop_class) if sop_class else None)


def _decode_raw(f: _RawFile, max_pixels: int, fit: int | None) -> DecodedDicom:
    v = f.values
    pixels, resampled = _decode_libjpeg(f.frame, f.rows, f.cols, max_pixels, fit)
    return _result(
        pixels, f.photometric, rows=f.rows, cols=f.cols,
        patient_id=str(v.get(dicom_header.PATIENT_ID, "")) or None,
        view_position=str(v.get(dicom_header.VIEW_POSITION, "")) or None,
        sex=str(v.get(dicom_header.PATIENT_SEX, "")) or None,
        age=parse_age(v.get(dicom_header.PATIENT_AGE)),
        transfer_syntax=JPEGBaseline8Bit, fast_path=True, resampled=resampled,
        body_part=str(v.get(dicom_header.BODY_PART_EXAMINED, "")) or None,
        burned_in_annotation=str(v.get(dicom_header.BURNED_IN_ANNOTATION, "")) or None,
    )


def _result(pixels: np.ndarray, photometric: str, **fields: Any) -> DecodedDicom:
    """The decoded image in MONOCHROME2 sense (bright = dense), whichever reader read it."""
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels
    return DecodedDicom(pixels=pixels, **fields)


def _decode_parsed(data: bytes, max_pixels: int, fit: int | None, sop_classes: str | None = None) -> DecodedDicom:
    ds = read_header(data, max_pixels)
    meta = getattr(ds, "file_meta", None)
    sop.judge(_text(ds, "SOPClassUID") or (_text(meta, "MediaStorageSOPClassUID") if meta is not None else None), sop_classes)
    if "PixelData" not in ds:
        raise DicomRejected("no_pixel_data", "dataset has no PixelData (7FE0,0010)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomRejected("multi_frame", f"NumberOfFrames={frames}")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise DicomRejected("bad_geometry", f"Rows={rows} Columns={cols}")
    check_size(rows, cols, max_pixels)
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    fast = libjpeg_decodes(ts, photometric, lambda: int(ds.get("BitsAllocated", 0)),
                           lambda: int(ds.get("SamplesPerPixel", 1)), lambda: _has_voi_or_rescale(ds))
    resampled = False
    if fast:
        pixels, resampled = _decode_libjpeg(_first_frame(ds), rows, cols, max_pixels, fit)
    else:
        if pydicom.uid.UID(ts).is_compressed and ts != DeflatedExplicitVRLittleEndian:
            _check_compressed(ds, ts, rows, cols)
        pixels = _decode_general(ds, photometric)
        if pixels.shape != (rows, cols):
            raise DicomRejected("bad_geometry", f"pixels {pixels.shape} but Rows={rows} Columns={cols}")
    return _result(
        pixels, photometric, rows=rows, cols=cols,
        patient_id=_text(ds, "PatientID"),
        view_position=_text(ds, "ViewPosition"),
        sex=_text(ds, "PatientSex"),
        age=parse_age(ds.get("PatientAge")),
        transfer_syntax=ts,
        fast_path=fast,
        resampled=resampled,
        body_part=_text(ds, "BodyPartExamined"),
        burned_in_annotation=_text(ds, "BurnedInAnnotation"),
    )


def _has_voi_or_rescale(ds: pydicom.Dataset) -> bool:
    slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
    return (
        slope != 1
        or intercept != 0
        or "WindowCenter" in ds
        or "VOILUTSequence" in ds
        or "ModalityLUTSequence" in ds
    )


def _first_frame(ds: pydicom.Dataset) -> bytes:
    try:
        return next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    except (StopIteration, ValueError, struct.error) as exc:
        raise DicomRejected("truncated", f"encapsulated frame unreadable ({exc})") from exc


def _check_frame(frame: bytes, ts: str, rows: int, cols: int) -> codestream.FrameGeometry | None:
    """Geometry before pixels: the codestream header against Rows/Columns (which passed the
    pixel limit already), and the end marker a complete stream ends with."""
    try:
        geom = codestream.frame_geometry(frame, ts)
    except codestream.CorruptPixelData as exc:
        raise DicomRejected("corrupt_pixel_data", str(exc)) from exc
    if geom is None:
        return None
    if (geom.rows, geom.cols) != (rows, cols):
        raise DicomRejected("bad_geometry", f"{geom.kind} header says {geom.cols}x{geom.rows} but Rows={rows} Columns={cols}")
    if not codestream.check_end_marker(frame):
        raise DicomRejected("truncated", f"{geom.kind} frame has no end-of-image marker")
    return geom


def _check_compressed(ds: pydicom.Dataset, ts: str, rows: int, cols: int) -> None:
    """The general path's checks of a compressed frame before pydicom decodes it; JPEG frames
    are also scanned strictly, since pydicom's JPEG plugins do not report corrupt data."""
    frame = _first_frame(ds)
    geom = _check_frame(frame, ts, rows, cols)
    if geom is not None:
        try:
            codestream.check_jpeg(frame, geom)
        except codestream.CorruptPixelData as exc:
            raise DicomRejected("corrupt_pixel_data", str(exc)) from exc


def _decode_libjpeg(frame: bytes, rows: int, cols: int, max_pixels: int, fit: int | None) -> tuple[np.ndarray, bool]:
    """The libjpeg decode: header checks, then one strict libjpeg-turbo decode, at a reduced
    n/8 scale when ``fit`` asks for a smaller image; True with the pixels if it did."""
    check_size(rows, cols, max_pixels)
    geom = _check_frame(frame, JPEGBaseline8Bit, rows, cols)
    assert geom is not None
    if geom.components != 1:
        raise DicomRejected("bad_geometry", f"JPEG frame has {geom.components} components but SamplesPerPixel=1")
    target = None
    if fit is not None:
        new_shape = letterbox_geometry(rows, cols, fit).new_shape
        target = new_shape if new_shape[0] < rows else None  # a smaller image is enlarged after decoding
    try:
        pixels = codestream.decode_jpeg(frame, target)
    except codestream.CorruptPixelData as exc:
        raise DicomRejected("corrupt_pixel_data", str(exc)) from exc
    return pixels, target is not None


def _decode_general(ds: pydicom.Dataset, photometric: str) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        msg = " ".join(str(exc).split())
        if "plugin" in msg or "decoder" in msg.lower() or "not supported" in msg:
            ts = ds.file_meta.get("TransferSyntaxUID", "?")
            raise DicomRejected("unsupported_transfer_syntax", f"{ts}: {msg[:DETAIL_CHARS]}") from exc
        raise DicomRejected("decode_error", describe(exc)) from exc
    except (ValueError, EOFError, struct.error) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = "truncated" if any(w in msg.lower() for w in ("less than expected", "truncat", "end of", "short")) else "decode_error"
        raise DicomRejected(reason, msg) from exc
    except Exception as exc:
        raise DicomRejected("decode_error", describe(exc)) from exc

    if photometric == "PALETTE COLOR":
        arr = pydicom.pixels.apply_color_lut(arr, ds)
        bits = 8 if arr.dtype == np.uint8 else 16
        return transforms.range_to_uint8(transforms.rgb_to_grey(arr), 0, 2**bits - 1)
    if arr.ndim == 3:
        if arr.shape[-1] != 3:
            raise DicomRejected("unsupported_photometric", f"{photometric} with shape {arr.shape}")
        if arr.dtype == np.uint8:
            return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY)
        bits = int(ds.get("BitsStored", 16))
        return transforms.range_to_uint8(transforms.rgb_to_grey(arr), 0, 2**bits - 1)
    if photometric not in ("MONOCHROME1", "MONOCHROME2", ""):
        raise DicomRejected("unsupported_photometric", photometric)
    return grey_to_uint8(arr, ds)


def grey_to_uint8(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    """Stored greyscale values -> 8 bits: Modality LUT, then VOI LUT or window, else min-max.

    An 8-bit unsigned image with no LUT or window is kept as it is, so the general and the
    libjpeg decode agree on the same pixels.
    """
    if arr.dtype == np.uint8 and not _has_voi_or_rescale(ds):
        return arr
    values = pydicom.pixels.apply_modality_lut(arr, ds)
    if "VOILUTSequence" in ds:
        item = ds.VOILUTSequence[0]
        out_bits = int(item.LUTDescriptor[2])
        values = pydicom.pixels.apply_voi(values, ds)
        return transforms.range_to_uint8(values, 0, 2**out_bits - 1)
    if "WindowCenter" in ds and "WindowWidth" in ds:
        center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if width >= 1:
            return transforms.window_to_uint8(values, center, width)
    return transforms.minmax_to_uint8(values)


def _first(value: Any) -> float:
    return float(value[0]) if isinstance(value, pydicom.multival.MultiValue) else float(value)
