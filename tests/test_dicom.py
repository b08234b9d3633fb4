"""Our DICOM decoding against pydicom's own, one file of every kind the SPEC lists."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pydicom.pixels
import pytest

from ingest.dicom import DicomRejected, decode_dicom, parse_age
from tests import dicom_factory as df


def _range_of_window_output(ds: pydicom.Dataset) -> tuple[float, float]:
    """The output range pydicom's ``apply_windowing`` maps onto (see its source)."""
    bits = int(ds.BitsStored)
    lo, hi = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if ds.PixelRepresentation else (0, 2**bits - 1)
    if "RescaleSlope" in ds and "RescaleIntercept" in ds:
        lo, hi = (v * float(ds.RescaleSlope) + float(ds.RescaleIntercept) for v in (lo, hi))
    return lo, hi


def pydicom_reference(path: Path) -> np.ndarray:
    """8-bit grey image made only with pydicom's decoders and LUT functions."""
    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    pi = ds.PhotometricInterpretation
    if pi == "PALETTE COLOR":
        rgb = pydicom.pixels.apply_color_lut(arr, ds).astype(np.float64)
        return np.rint((rgb @ [0.299, 0.587, 0.114]) * 255 / 65535).astype(np.uint8)
    if arr.ndim == 3:
        return np.rint(arr.astype(np.float64) @ [0.299, 0.587, 0.114]).clip(0, 255).astype(np.uint8)
    has_lut = any(k in ds for k in ("WindowCenter", "VOILUTSequence")) or float(ds.get("RescaleSlope", 1)) != 1 or float(ds.get("RescaleIntercept", 0)) != 0
    if arr.dtype == np.uint8 and not has_lut:
        out = arr
    else:
        modality = pydicom.pixels.apply_modality_lut(arr, ds)
        values = modality.astype(np.float64)  # no uint16 wrap-around in the arithmetic below
        if "VOILUTSequence" in ds:
            bits = ds.VOILUTSequence[0].LUTDescriptor[2]
            out = np.rint(pydicom.pixels.apply_voi(modality, ds).astype(np.float64) * 255 / (2**bits - 1))
        elif "WindowCenter" in ds:
            lo, hi = _range_of_window_output(ds)
            out = np.rint((pydicom.pixels.apply_windowing(values, ds) - lo) * 255 / (hi - lo))
        else:
            out = np.rint((values - values.min()) * 255 / (values.max() - values.min()))
        out = out.clip(0, 255).astype(np.uint8)
    return 255 - out if pi == "MONOCHROME1" else out


KINDS: list[tuple[str, Callable[[Path], Path], bool]] = [
    ("jpeg_baseline", df.write_jpeg_baseline, True),
    ("explicit_le_8bit", df.write_explicit_le_8bit, False),
    ("implicit_le", df.write_implicit_le, False),
    ("explicit_be", df.write_explicit_be, False),
    ("deflated", df.write_deflated, False),
    ("rle", df.write_rle_lossless, False),
    ("jpeg2000", df.write_jpeg2000_lossless, False),
    ("jpegls", df.write_jpegls_lossless, False),
    ("mono12_rescale_window", df.write_12bit_rescale, False),
    ("mono16_rescale", df.write_16bit_rescale, False),
    ("mono16_voi_lut", df.write_16bit_voi_lut, False),
    ("monochrome1", df.write_monochrome1, False),
    ("signed16", df.write_signed_16bit, False),
    ("rgb", df.write_rgb, False),
    ("palette", df.write_palette_color, False),
    ("uid_named", df.write_uid_named, True),
]


@pytest.mark.parametrize("kind, write, fast", KINDS, ids=[k[0] for k in KINDS])
def test_decode_matches_pydicom(tmp_path: Path, kind: str, write, fast: bool) -> None:
    path = write(tmp_path)
    ours = decode_dicom(path.read_bytes())
    ref = pydicom_reference(path)
    assert ours.fast_path is fast
    assert ours.pixels.dtype == np.uint8 and ours.pixels.shape == ref.shape
    diff = np.abs(ours.pixels.astype(int) - ref.astype(int))
    # OpenCV and pylibjpeg both use libjpeg-turbo's integer IDCT; rounding may differ by 1.
    assert diff.max() <= 1, f"{kind}: max difference {diff.max()}"
    assert ours.pixels.std() > 5, f"{kind}: decoded to a flat image"


@pytest.mark.parametrize(
    "write, reason",
    [
        (df.write_multiframe, "multi_frame"),
        (df.write_no_pixel_data, "no_pixel_data"),
        (df.write_truncated, "truncated"),
        (lambda d: df.write_truncated(d, compressed=True), "truncated"),
        (df.write_not_dicom, "not_dicom"),
        (lambda d: df.write_not_dicom(d, kind="text"), "not_dicom"),
        (lambda d: df.write_not_dicom(d, kind="empty"), "not_dicom"),
    ],
)
def test_rejects_with_reason(tmp_path: Path, write, reason: str) -> None:
    with pytest.raises(DicomRejected) as info:
        decode_dicom(write(tmp_path).read_bytes())
    assert info.value.reason == reason
    assert "\n" not in str(info.value)


def test_header_fields_kept(tmp_path: Path) -> None:
    path = df.make_rsna_like(tmp_path / "p.dcm", "p", rows=48, cols=64)
    got = decode_dicom(path.read_bytes())
    assert got.view_position in ("PA", "AP") and got.sex in ("M", "F") and isinstance(got.age, int)


@pytest.mark.parametrize(
    "value, years",
    [("43", 43), ("043Y", 43), ("006M", 0), ("2W", 0), ("", None), ("abc", None), ("999", None), (None, None)],
)
def test_parse_age(value, years) -> None:
    assert parse_age(value) == years
