"""Our DICOM decoding against images computed by hand from the stored values and the DICOM
standard's transforms, one file of every kind the SPEC lists."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest

from ingest.dicom import DicomRejected, decode_dicom, parse_age
from tests import dicom_factory as df


# Expected images, computed from the values each factory file stores (``df.pattern`` with the
# arguments its writer documents) and the transforms the DICOM standard defines, in the order
# the SPEC gives: Modality LUT (rescale), then VOI LUT or the first window, else the stored
# range min-max to 0..255; MONOCHROME1 inverted; colour to grey by ITU-R BT.601 weights.


def _minmax(values: np.ndarray) -> np.ndarray:
    v = values.astype(np.float64)
    return np.rint((v - v.min()) / (v.max() - v.min()) * 255)


def _linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1, LINEAR, onto 0..255."""
    lo_edge, hi_edge = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    inside = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.rint(np.where(x <= lo_edge, 0, np.where(x > hi_edge, 255, inside)))


def _bt601(r: np.ndarray, g: np.ndarray, b: np.ndarray) -> np.ndarray:
    return 0.299 * r.astype(np.float64) + 0.587 * g + 0.114 * b


def _stored(bits: int, **kw) -> np.ndarray:
    return df.pattern(low=0, high=2**bits - 1, dtype=np.uint16, **kw)


def _mono12_rescale_window(path: Path) -> np.ndarray:
    return _linear_window(0.5 * _stored(12).astype(np.float64) - 100, 900, 1600)


def _mono16_rescale(path: Path) -> np.ndarray:  # the first of two window presets
    return _linear_window(0.25 * _stored(16).astype(np.float64) + 10, 8000, 12000)


def _mono16_voi_lut(path: Path) -> np.ndarray:
    first, entries = 1000, 2048  # the factory's sigmoid LUT, 16-bit output
    lut = np.round(65535.0 / (1.0 + np.exp(-np.linspace(-4.0, 4.0, entries))))
    stored = df.pattern(low=500, high=4000, dtype=np.uint16)
    return np.rint(lut[np.clip(stored.astype(int) - first, 0, entries - 1)] * 255 / 65535)


def _monochrome1(path: Path) -> np.ndarray:
    return 255 - _linear_window(_stored(12).astype(np.float64), 2048, 4096)


def _rgb(path: Path) -> np.ndarray:
    return np.rint(_bt601(df.pattern(seed=0), df.pattern(seed=1)[::-1], 255 - df.pattern(seed=2).astype(int)))


def _palette(path: Path) -> np.ndarray:
    index = df.pattern().astype(np.float64)
    red, green = index * 257, (255 - index) * 257
    blue = np.round(32767.5 + 32767.5 * np.sin(index / 20.0))
    return np.rint(_bt601(red, green, blue) * 255 / 65535)


def _pydicom_as_is(path: Path) -> np.ndarray:
    """A lossy JPEG's pixels as pydicom decodes them: 8-bit MONOCHROME2 with no LUT is the image."""
    return pydicom.dcmread(path).pixel_array


KINDS: list[tuple[str, Callable[[Path], Path], bool, Callable[[Path], np.ndarray]]] = [
    ("jpeg_baseline", df.write_jpeg_baseline, True, _pydicom_as_is),
    ("explicit_le_8bit", df.write_explicit_le_8bit, False, lambda p: df.pattern()),
    ("implicit_le", df.write_implicit_le, False, lambda p: _minmax(_stored(12))),
    ("explicit_be", df.write_explicit_be, False, lambda p: _minmax(_stored(12))),
    ("deflated", df.write_deflated, False, lambda p: df.pattern()),
    ("rle", df.write_rle_lossless, False, lambda p: df.pattern()),
    ("jpeg2000", df.write_jpeg2000_lossless, False, lambda p: _minmax(_stored(12))),
    ("jpegls", df.write_jpegls_lossless, False, lambda p: _minmax(_stored(12))),
    ("mono12_rescale_window", df.write_12bit_rescale, False, _mono12_rescale_window),
    ("mono16_rescale", df.write_16bit_rescale, False, _mono16_rescale),
    ("mono16_voi_lut", df.write_16bit_voi_lut, False, _mono16_voi_lut),
    ("monochrome1", df.write_monochrome1, False, _monochrome1),
    ("signed16", df.write_signed_16bit, False, lambda p: _minmax(df.pattern(low=-32768, high=32767, dtype=np.int16))),
    ("rgb", df.write_rgb, False, _rgb),
    ("palette", df.write_palette_color, False, _palette),
    ("uid_named", df.write_uid_named, True, _pydicom_as_is),
]


@pytest.mark.parametrize("kind, write, fast, expected", KINDS, ids=[k[0] for k in KINDS])
def test_decode_gives_the_standards_image(tmp_path: Path, kind: str, write, fast: bool, expected) -> None:
    path = write(tmp_path)
    ours = decode_dicom(path.read_bytes())
    ref = np.asarray(expected(path))
    assert ours.fast_path is fast
    assert ours.pixels.dtype == np.uint8 and ours.pixels.shape == ref.shape == (df.ROWS, df.COLS)
    diff = np.abs(ours.pixels.astype(int) - ref.astype(int))
    # Rounding of the last step (and libjpeg-turbo's integer IDCT against pylibjpeg's) may differ by 1.
    assert diff.max() <= 1, f"{kind}: max difference {diff.max()}"
    assert ours.pixels.std() > 5, f"{kind}: decoded to a flat image"


def test_a_lossy_jpeg_decodes_near_the_values_it_stored(tmp_path: Path) -> None:
    """The JPEG rows above compare with pydicom's decode; this one with the stored values."""
    ours = decode_dicom(df.write_jpeg_baseline(tmp_path).read_bytes()).pixels
    assert np.abs(ours.astype(int) - df.pattern().astype(int)).mean() < 4


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
