"""Tests of tests/dicom_factory.py: every file it writes is what it says it is."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom import uid as dicom_uid
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut

from tests.dicom_factory import (
    CASES,
    COLS,
    DEFAULT_UID_NAME,
    ROWS,
    FactoryCase,
    make_rsna_like,
    pattern,
    write_12bit_rescale,
    write_16bit_rescale,
    write_16bit_voi_lut,
    write_deflated,
    write_explicit_be,
    write_explicit_le_8bit,
    write_implicit_le,
    write_jpeg2000_lossless,
    write_jpeg_baseline,
    write_jpegls_lossless,
    write_monochrome1,
    write_multiframe,
    write_no_pixel_data,
    write_not_dicom,
    write_palette_color,
    write_rgb,
    write_rle_lossless,
    write_signed_16bit,
    write_truncated,
    write_uid_named,
)

P12 = pattern(low=0, high=4095, dtype=np.uint16)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_case_reads_and_decodes_as_declared(tmp_path: Path, case: FactoryCase) -> None:
    path = case.write(tmp_path)
    assert path.is_file() and path.parent == tmp_path
    assert path.stat().st_size < 16_000  # tiny
    if not case.is_dicom:
        with pytest.raises(InvalidDicomError):
            pydicom.dcmread(path)
        return
    with pytest.warns(UserWarning) if case.name == "truncated_jpeg" else nullcontext():
        ds = pydicom.dcmread(path)
    assert path.read_bytes()[128:132] == b"DICM"
    if case.decodes:
        pixels = ds.pixel_array
        frames = int(ds.get("NumberOfFrames", 1))
        shape = (ds.Rows, ds.Columns) if frames == 1 else (frames, ds.Rows, ds.Columns)
        if ds.SamplesPerPixel == 3:
            shape = (*shape, 3)
        assert pixels.shape == shape
    else:
        with pytest.raises((ValueError, AttributeError)):
            _ = ds.pixel_array


@pytest.mark.parametrize(
    ("write", "transfer_syntax", "expected"),
    [
        (write_explicit_le_8bit, dicom_uid.ExplicitVRLittleEndian, pattern()),
        (write_implicit_le, dicom_uid.ImplicitVRLittleEndian, P12),
        (write_explicit_be, dicom_uid.ExplicitVRBigEndian, P12),
        (write_deflated, dicom_uid.DeflatedExplicitVRLittleEndian, pattern()),
        (write_rle_lossless, dicom_uid.RLELossless, pattern()),
        (write_jpeg2000_lossless, dicom_uid.JPEG2000Lossless, P12),
        (write_jpegls_lossless, dicom_uid.JPEGLSLossless, P12),
        (write_12bit_rescale, dicom_uid.ExplicitVRLittleEndian, P12),
        (write_monochrome1, dicom_uid.ExplicitVRLittleEndian, P12),
    ],
    ids=lambda v: getattr(v, "__name__", None),
)
def test_lossless_pixels_are_the_pattern(
    tmp_path: Path, write: Callable[[Path], Path], transfer_syntax: str, expected: np.ndarray
) -> None:
    ds = pydicom.dcmread(write(tmp_path))
    assert ds.file_meta.TransferSyntaxUID == transfer_syntax
    assert (ds.Rows, ds.Columns) == (ROWS, COLS) == expected.shape
    np.testing.assert_array_equal(ds.pixel_array, expected)


def test_rle_16bit_is_lossless(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_rle_lossless(tmp_path, bits_stored=16))
    assert ds.BitsAllocated == 16
    np.testing.assert_array_equal(ds.pixel_array, pattern(high=65535, dtype=np.uint16))


def test_jpeg_baseline_is_the_rsna_fast_path(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_jpeg_baseline(tmp_path))
    assert ds.file_meta.TransferSyntaxUID == dicom_uid.JPEGBaseline8Bit
    assert (ds.BitsAllocated, ds.PhotometricInterpretation) == (8, "MONOCHROME2")
    assert np.abs(ds.pixel_array.astype(int) - pattern()).mean() < 3.0


def test_rescale_and_window_tags(tmp_path: Path) -> None:
    ds12 = pydicom.dcmread(write_12bit_rescale(tmp_path))
    assert (ds12.BitsAllocated, ds12.BitsStored, ds12.HighBit) == (16, 12, 11)
    np.testing.assert_allclose(apply_modality_lut(ds12.pixel_array, ds12), P12 * 0.5 - 100)
    assert (float(ds12.WindowCenter), float(ds12.WindowWidth)) == (900.0, 1600.0)

    ds16 = pydicom.dcmread(write_16bit_rescale(tmp_path))
    assert (ds16.BitsAllocated, ds16.BitsStored) == (16, 16)
    raw = pattern(high=65535, dtype=np.uint16)
    np.testing.assert_allclose(apply_modality_lut(ds16.pixel_array, ds16), raw * 0.25 + 10)
    assert [float(v) for v in ds16.WindowCenter] == [8000.0, 9000.0]  # two presets
    windowed = apply_voi_lut(apply_modality_lut(ds16.pixel_array, ds16), ds16)
    assert windowed.shape == (ROWS, COLS)


@pytest.mark.parametrize("with_window", [False, True])
def test_voi_lut_sequence(tmp_path: Path, with_window: bool) -> None:
    ds = pydicom.dcmread(write_16bit_voi_lut(tmp_path, with_window=with_window))
    item = ds.VOILUTSequence[0]
    assert list(item.LUTDescriptor) == [2048, 1000, 16]
    assert ("WindowCenter" in ds) == with_window
    raw = ds.pixel_array
    assert raw.min() < 1000 and raw.max() > 1000 + 2048  # values on both sides clamp
    out = apply_voi_lut(raw, ds)  # the LUT wins over a window when both are present
    lut = np.asarray(item.LUTData)
    np.testing.assert_array_equal(out, lut[np.clip(raw.astype(int) - 1000, 0, 2047)])


def test_monochrome1_is_marked_for_inversion(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_monochrome1(tmp_path))
    assert ds.PhotometricInterpretation == "MONOCHROME1"


@pytest.mark.parametrize(("bits_stored", "sign_extended"), [(16, True), (12, True), (12, False)])
def test_signed_pixels(tmp_path: Path, bits_stored: int, sign_extended: bool) -> None:
    path = write_signed_16bit(tmp_path, bits_stored=bits_stored, sign_extended=sign_extended)
    ds = pydicom.dcmread(path)
    assert (ds.PixelRepresentation, ds.BitsStored) == (1, bits_stored)
    half = 2 ** (bits_stored - 1)
    expected = pattern(low=-half, high=half - 1, dtype=np.int16)
    assert expected.min() < 0
    np.testing.assert_array_equal(ds.pixel_array, expected)  # pydicom sign-extends
    words = np.frombuffer(ds.PixelData, dtype="<i2").reshape(ROWS, COLS)
    assert np.array_equal(words, expected) == sign_extended


@pytest.mark.parametrize("planar_configuration", [0, 1])
def test_rgb(tmp_path: Path, planar_configuration: int) -> None:
    path = write_rgb(tmp_path, planar_configuration=planar_configuration)
    ds = pydicom.dcmread(path)
    assert (ds.SamplesPerPixel, ds.PlanarConfiguration) == (3, planar_configuration)
    rgb = ds.pixel_array
    assert rgb.shape == (ROWS, COLS, 3) and rgb.dtype == np.uint8
    np.testing.assert_array_equal(rgb[..., 0], pattern(seed=0))
    np.testing.assert_array_equal(rgb[..., 2], 255 - pattern(seed=2))


def test_palette_color(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_palette_color(tmp_path))
    assert ds.PhotometricInterpretation == "PALETTE COLOR"
    idx = ds.pixel_array
    np.testing.assert_array_equal(idx, pattern())
    rgb = apply_color_lut(idx, ds)
    assert rgb.shape == (ROWS, COLS, 3)
    np.testing.assert_array_equal(rgb[..., 0], idx.astype(np.uint16) * 257)
    np.testing.assert_array_equal(rgb[..., 1], (255 - idx.astype(np.uint16)) * 257)


def test_multiframe(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_multiframe(tmp_path))
    assert ds.NumberOfFrames == 3
    frames = ds.pixel_array
    assert frames.shape == (3, ROWS, COLS)
    for i in range(3):
        np.testing.assert_array_equal(frames[i], pattern(seed=i))
    assert not np.array_equal(frames[0], frames[1])


def test_truncated_uncompressed_fails_at_decode(tmp_path: Path) -> None:
    path = write_truncated(tmp_path)
    ds = pydicom.dcmread(path)
    assert len(ds.PixelData) < ROWS * COLS
    with pytest.raises(ValueError, match="less than expected"):
        _ = ds.pixel_array


def test_truncated_jpeg_loses_its_pixel_data(tmp_path: Path) -> None:
    path = write_truncated(tmp_path, compressed=True)
    with pytest.warns(UserWarning, match="End of file"):
        ds = pydicom.dcmread(path)
    assert "PixelData" not in ds
    with pytest.raises(AttributeError):
        _ = ds.pixel_array


@pytest.mark.parametrize("kind", ["bytes", "text", "empty"])
def test_not_dicom(tmp_path: Path, kind: str) -> None:
    path = write_not_dicom(tmp_path, kind=kind)
    assert path.suffix == ".dcm"
    with pytest.raises(InvalidDicomError):
        pydicom.dcmread(path)


def test_not_dicom_rejects_unknown_kind(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="kind='pdf'"):
        write_not_dicom(tmp_path, kind="pdf")


def test_no_pixel_data(tmp_path: Path) -> None:
    ds = pydicom.dcmread(write_no_pixel_data(tmp_path))
    assert "PixelData" not in ds and ds.Rows == ROWS
    with pytest.raises(AttributeError):
        _ = ds.pixel_array


def test_uid_named_file_has_no_dcm_suffix(tmp_path: Path) -> None:
    path = write_uid_named(tmp_path)
    assert path.name == DEFAULT_UID_NAME and path.suffix != ".dcm"
    assert path.read_bytes()[128:132] == b"DICM"
    assert pydicom.dcmread(path).pixel_array.shape == (ROWS, COLS)


def test_make_rsna_like(tmp_path: Path) -> None:
    path = make_rsna_like(tmp_path / "sub" / "abc.dcm", "abc", rows=48, cols=64, seed=4)
    ds = pydicom.dcmread(path)
    assert ds.PatientID == "abc" and ds.Modality == "CR" and ds["PatientAge"].value == "43"
    assert ds.file_meta.TransferSyntaxUID == dicom_uid.JPEGBaseline8Bit
    assert ds.pixel_array.shape == (48, 64)
    again = make_rsna_like(tmp_path / "again.dcm", "abc", rows=48, cols=64, seed=4)
    assert again.read_bytes() == path.read_bytes()  # deterministic
