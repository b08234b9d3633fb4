"""DICOM decoding to an 8-bit greyscale image, with a fast path for RSNA's JPEG Baseline.

Fast path: 8-bit single-frame monochrome JPEG Baseline, the whole RSNA set. The
encapsulated JPEG frame is handed to OpenCV (libjpeg-turbo), about 5x faster than pydicom's
``pixel_array`` through pylibjpeg. Everything else goes through pydicom and its plugins, then
Modality LUT (rescale), VOI LUT or window, MONOCHROME1 inversion and colour-to-grey.

Every way a file can fail becomes a :class:`DicomRejected` with a short machine-readable
``reason`` (see :data:`REASONS`) and a one-line human ``detail``.
"""

from __future__ import annotations

import dataclasses
import io
import re
import struct
import warnings
from typing import Any

import cv2
import numpy as np
import pydicom
import pydicom.config
import pydicom.encaps
import pydicom.pixels
from pydicom.errors import InvalidDicomError
from pydicom.uid import JPEGBaseline8Bit

from ingest import transforms

# RSNA's PatientAge ('43') is not a conformant AS value; we parse it ourselves (parse_age).
pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE

REASONS = {
    "not_dicom": "not a DICOM file (no 'DICM' preamble, or unparseable header)",
    "truncated": "the file ends before its pixel data does",
    "no_pixel_data": "the dataset has no PixelData element",
    "multi_frame": "more than one frame; this pipeline takes single radiographs",
    "bad_geometry": "Rows/Columns missing, zero or inconsistent with the pixels",
    "unsupported_transfer_syntax": "no installed decoder handles this transfer syntax",
    "decode_error": "the pixel data could not be decoded",
    "unsupported_photometric": "photometric interpretation this pipeline cannot convert",
}
"""Reject reasons raised by :func:`decode_dicom`, with what they mean."""


class DicomRejected(Exception):
    """A file that cannot become a sample; ``reason`` is a key of :data:`REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


@dataclasses.dataclass(frozen=True)
class DecodedDicom:
    """An image as 8-bit grey at source resolution, and the header fields we keep."""

    pixels: np.ndarray
    """uint8 (rows, cols), MONOCHROME2 sense (bright = dense)."""
    view_position: str | None
    sex: str | None
    age: int | None
    transfer_syntax: str
    fast_path: bool


_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) little endian
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


def read_header(data: bytes) -> pydicom.Dataset:
    """Parse a whole DICOM file held in memory; reject non-DICOM and truncated headers."""
    if len(data) < 132 or data[128:132] != b"DICM":
        raise DicomRejected("not_dicom", "no 'DICM' marker at byte 128")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            ds = pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError as exc:
        raise DicomRejected("not_dicom", str(exc)) from exc
    except (EOFError, struct.error, OverflowError) as exc:
        raise DicomRejected("truncated", f"header ends early ({exc})") from exc
    except Exception as exc:  # pydicom raises many types on a garbled header
        raise DicomRejected("not_dicom", f"unparseable header ({type(exc).__name__}: {exc})") from exc
    ended_early = [str(w.message) for w in caught if "End of file reached" in str(w.message)]
    if ended_early:
        raise DicomRejected("truncated", ended_early[0])
    if "PixelData" not in ds and _PIXEL_DATA_TAG in data:
        raise DicomRejected("truncated", "PixelData (7FE0,0010) element is cut short")
    return ds


def decode_dicom(data: bytes) -> DecodedDicom:
    """Decode a DICOM file's bytes to an 8-bit greyscale image.

    Raises:
        DicomRejected: for anything that cannot become a single 8-bit greyscale image.
    """
    ds = read_header(data)
    if "PixelData" not in ds:
        raise DicomRejected("no_pixel_data", "dataset has no PixelData (7FE0,0010)")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raise DicomRejected("multi_frame", f"NumberOfFrames={frames}")
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows <= 0 or cols <= 0:
        raise DicomRejected("bad_geometry", f"Rows={rows} Columns={cols}")
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    fast = (
        ts == JPEGBaseline8Bit
        and int(ds.get("BitsAllocated", 0)) == 8
        and int(ds.get("SamplesPerPixel", 1)) == 1
        and photometric in ("MONOCHROME1", "MONOCHROME2")
        and not _has_voi_or_rescale(ds)
    )
    pixels = _decode_fast(ds, rows, cols) if fast else _decode_general(ds, photometric)
    if pixels.shape != (rows, cols):
        raise DicomRejected("bad_geometry", f"pixels {pixels.shape} but Rows={rows} Columns={cols}")
    if photometric == "MONOCHROME1":
        pixels = 255 - pixels
    return DecodedDicom(
        pixels=pixels,
        view_position=_text(ds, "ViewPosition"),
        sex=_text(ds, "PatientSex"),
        age=parse_age(ds.get("PatientAge")),
        transfer_syntax=ts,
        fast_path=fast,
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


def _decode_fast(ds: pydicom.Dataset, rows: int, cols: int) -> np.ndarray:
    try:
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
    except (StopIteration, ValueError, struct.error) as exc:
        raise DicomRejected("truncated", f"encapsulated frame unreadable ({exc})") from exc
    if b"\xff\xd9" not in frame[-4:]:
        raise DicomRejected("truncated", "JPEG frame has no end-of-image marker")
    image = cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_UNCHANGED)
    if image is None or image.ndim != 2:
        raise DicomRejected("decode_error", "OpenCV could not decode the JPEG Baseline frame")
    return image


def _decode_general(ds: pydicom.Dataset, photometric: str) -> np.ndarray:
    try:
        arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        msg = str(exc)
        if "plugin" in msg or "decoder" in msg.lower() or "not supported" in msg:
            ts = ds.file_meta.get("TransferSyntaxUID", "?")
            raise DicomRejected("unsupported_transfer_syntax", f"{ts}: {msg.splitlines()[0]}") from exc
        raise DicomRejected("decode_error", msg.splitlines()[0] if msg else type(exc).__name__) from exc
    except (ValueError, EOFError, struct.error) as exc:
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        reason = "truncated" if any(w in msg.lower() for w in ("less than expected", "truncat", "end of", "short")) else "decode_error"
        raise DicomRejected(reason, msg) from exc
    except Exception as exc:
        raise DicomRejected("decode_error", f"{type(exc).__name__}: {exc}") from exc

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
    fast path agree on the same pixels.
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
