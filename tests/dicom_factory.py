"""Tiny DICOM files of every messy kind the ingest decoder meets, for its tests.

Each ``write_*`` function takes a folder (a pytest ``tmp_path``) and a name, writes one file
of a few kilobytes and returns its path. The name is the file's stem (``<name>.dcm``) and
its PatientID, except for :func:`write_uid_named`, whose name is the whole file name. The
pixel content is deterministic (:func:`pattern`), so a decoder's output can be compared with
pydicom's own ``ds.pixel_array`` (plus ``pydicom.pixels`` modality / VOI / colour helpers).

What pydicom 3.0.2 does with the broken ones (the decoder must turn each into a reject):

* :func:`write_truncated` (uncompressed): ``dcmread`` works, ``pixel_array`` raises
  ``ValueError`` (fewer pixel bytes than Rows x Columns needs).
* :func:`write_truncated` (``compressed=True``, JPEG Baseline): ``dcmread`` warns that the
  sequence delimiter is missing and drops PixelData; ``pixel_array`` raises AttributeError.
* :func:`write_not_dicom`: ``dcmread`` raises ``InvalidDicomError``.
* :func:`write_no_pixel_data`: ``dcmread`` works, ``pixel_array`` raises ``AttributeError``.

Encoders: RLE Lossless and JPEG 2000 Lossless come with pydicom + pylibjpeg-rle /
pylibjpeg-openjpeg. JPEG-LS needs ``pyjpegls``; without it :func:`write_jpegls_lossless`
skips the calling test. Explicit VR Big Endian (retired, still met in old archives) is
written by hand: pydicom writes the header big endian, the OW pixel bytes are swapped here.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom import uid as dicom_uid
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.pixels.encoders import JPEGLSLosslessEncoder

from ingest.synth import CR_SOP_CLASS_UID, derived_uid, synthetic_chest, write_dicom

__all__ = [
    "CASES",
    "DEFAULT_UID_NAME",
    "FactoryCase",
    "jpegls_encoder_available",
    "make_rsna_like",
    "pattern",
    "write_12bit_rescale",
    "write_16bit_rescale",
    "write_16bit_voi_lut",
    "damage_frame",
    "frame_span",
    "patch_frame_size",
    "write_deflate_bomb",
    "write_deflated",
    "write_explicit_be",
    "write_explicit_le_8bit",
    "write_implicit_le",
    "write_jpeg2000_lossless",
    "write_jpeg_baseline",
    "write_jpegls_lossless",
    "write_mono",
    "write_monochrome1",
    "write_multiframe",
    "write_no_pixel_data",
    "write_not_dicom",
    "write_palette_color",
    "write_rgb",
    "write_rle_lossless",
    "write_signed_16bit",
    "write_truncated",
    "write_uid_named",
]

ROWS, COLS = 48, 64  # non-square on purpose: catches rows/columns mix-ups
DEFAULT_UID_NAME = "1.2.826.0.1.3680043.8.498.10123.20231.3.1"


def jpegls_encoder_available() -> bool:
    """Whether pydicom can encode JPEG-LS here (it needs the ``pyjpegls`` package)."""
    return bool(JPEGLSLosslessEncoder.is_available)


def pattern(
    rows: int = ROWS,
    cols: int = COLS,
    *,
    low: int = 0,
    high: int = 255,
    dtype: np.dtype | type = np.uint8,
    seed: int = 0,
) -> np.ndarray:
    """Return a deterministic test image with values in ``[low, high]``.

    A diagonal ramp, a bright disc and a little seeded noise: smooth enough for JPEG, with
    structure enough that a transposed or flipped decode is caught.

    Args:
        rows: Number of rows.
        cols: Number of columns.
        low: Smallest value.
        high: Largest value.
        dtype: Output dtype (must hold ``low`` and ``high``).
        seed: Seed of the noise.

    Returns:
        A (rows, cols) array of ``dtype``.
    """
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float64)
    ramp = 0.6 * x / max(cols - 1, 1) + 0.4 * y / max(rows - 1, 1)
    disc = ((x - 0.65 * cols) ** 2 + (y - 0.35 * rows) ** 2) < (0.2 * min(rows, cols)) ** 2
    value = 0.7 * ramp + 0.25 * disc + 0.05 * rng.random((rows, cols))
    return np.round(low + value * (high - low)).astype(dtype)


# --------------------------------------------------------------------------- builders


def _path(directory: Path, name: str, suffix: str = ".dcm") -> Path:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{name}{suffix}"


def _dataset(name: str, rows: int, cols: int, transfer_syntax_uid: str) -> Dataset:
    """A minimal CR image header (no pixel module) with its file meta."""
    sop_uid = derived_uid("dicom_factory", name, "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_SOP_CLASS_UID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = transfer_syntax_uid
    meta.ImplementationClassUID = derived_uid("dicom_factory", "implementation")
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = CR_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_uid
    ds.Modality = "CR"
    ds.PatientID = name
    ds.PatientName = name
    ds.PatientSex = "F"
    ds.ViewPosition = "AP"
    ds.StudyInstanceUID = derived_uid("dicom_factory", name, "study")
    ds.SeriesInstanceUID = derived_uid("dicom_factory", name, "series")
    ds.Rows = rows
    ds.Columns = cols
    return ds


def _set_pixels(
    ds: Dataset,
    arr: np.ndarray,
    *,
    photometric: str,
    bits_stored: int,
    big_endian: bool = False,
) -> None:
    """Fill the image pixel module of ``ds`` from ``arr`` (uncompressed bytes).

    ``arr`` is (rows, cols), (frames, rows, cols) or (rows, cols, 3); its dtype sets
    BitsAllocated and PixelRepresentation.
    """
    if arr.dtype.itemsize not in (1, 2):
        raise ValueError(f"arr.dtype={arr.dtype}: allowed 8- or 16-bit integers")
    samples = 3 if photometric in ("RGB", "YBR_FULL") else 1
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples == 3:
        ds.PlanarConfiguration = 0
    bits_allocated = 8 * arr.dtype.itemsize
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = int(arr.dtype.kind == "i")
    data = arr.astype(arr.dtype.newbyteorder(">" if big_endian else "<")).tobytes()
    if len(data) % 2:
        data += b"\x00"  # DICOM values have even length
    ds.PixelData = data
    ds["PixelData"].VR = "OB" if bits_allocated == 8 else "OW"


def _save(ds: Dataset, path: Path) -> Path:
    ds.save_as(path, enforce_file_format=True)
    return path


def write_mono(
    directory: Path,
    name: str,
    *,
    rows: int = ROWS,
    cols: int = COLS,
    bits_stored: int = 8,
    signed: bool = False,
    photometric: str = "MONOCHROME2",
    transfer_syntax_uid: str = dicom_uid.ExplicitVRLittleEndian,
    frames: int = 1,
    attributes: dict[str, object] | None = None,
    pixels: np.ndarray | None = None,
) -> Path:
    """Write a greyscale image of any bit depth / transfer syntax; the general builder.

    Args:
        directory: Folder to write into.
        name: File stem and PatientID.
        rows: Number of rows.
        cols: Number of columns.
        bits_stored: 8 (8-bit allocated) or 9..16 (16-bit allocated).
        signed: PixelRepresentation 1 (two's complement, sign-extended to 16 bits).
        photometric: MONOCHROME2 or MONOCHROME1.
        transfer_syntax_uid: Any uncompressed syntax, or RLE / JPEG 2000 / JPEG-LS
            lossless (compressed here with ``Dataset.compress``).
        frames: NumberOfFrames; above 1 each frame gets its own pattern.
        attributes: Extra header keywords and values (e.g. ``RescaleSlope``).
        pixels: Use these pixels instead of the pattern (shape and dtype must fit).

    Returns:
        The written path.
    """
    if not 8 <= bits_stored <= 16:
        raise ValueError(f"bits_stored={bits_stored!r}: allowed 8..16")
    dtype: type = (np.int8 if signed else np.uint8) if bits_stored == 8 else (
        np.int16 if signed else np.uint16
    )
    if pixels is None:
        low, high = (-(2 ** (bits_stored - 1)), 2 ** (bits_stored - 1) - 1) if signed else (
            0, 2**bits_stored - 1
        )
        frame_list = [
            pattern(rows, cols, low=low, high=high, dtype=dtype, seed=i) for i in range(frames)
        ]
        pixels = frame_list[0] if frames == 1 else np.stack(frame_list)
    ts = dicom_uid.UID(transfer_syntax_uid)
    native_ts = ts if not ts.is_compressed else dicom_uid.ExplicitVRLittleEndian
    ds = _dataset(name, rows, cols, native_ts)
    if frames > 1:
        ds.NumberOfFrames = frames
    for keyword, value in (attributes or {}).items():
        setattr(ds, keyword, value)
    _set_pixels(
        ds, pixels, photometric=photometric, bits_stored=bits_stored,
        big_endian=not ts.is_little_endian,
    )
    if ts.is_compressed:
        ds.compress(ts, generate_instance_uid=False)
    return _save(ds, _path(directory, name))


# --------------------------------------------------------------------------- transfer syntaxes


def write_jpeg_baseline(
    directory: Path, name: str = "jpeg_baseline", *, rows: int = ROWS, cols: int = COLS
) -> Path:
    """8-bit MONOCHROME2 JPEG Baseline (1.2.840.10008.1.2.4.50), as RSNA ships: the fast path."""
    return write_dicom(
        _path(directory, name), pattern(rows, cols), patient_id=name,
        transfer_syntax="jpeg_baseline",
    )


def write_explicit_le_8bit(
    directory: Path, name: str = "explicit_le_8bit", *, rows: int = ROWS, cols: int = COLS
) -> Path:
    """8-bit MONOCHROME2, uncompressed Explicit VR Little Endian."""
    return write_dicom(
        _path(directory, name), pattern(rows, cols), patient_id=name,
        transfer_syntax="explicit_vr_little_endian",
    )


def write_implicit_le(directory: Path, name: str = "implicit_le") -> Path:
    """12-bit (16 allocated) MONOCHROME2, Implicit VR Little Endian."""
    return write_mono(
        directory, name, bits_stored=12, transfer_syntax_uid=dicom_uid.ImplicitVRLittleEndian
    )


def write_explicit_be(directory: Path, name: str = "explicit_be") -> Path:
    """12-bit (16 allocated) MONOCHROME2, Explicit VR Big Endian: pixel bytes big endian."""
    return write_mono(
        directory, name, bits_stored=12, transfer_syntax_uid=dicom_uid.ExplicitVRBigEndian
    )


def write_deflated(directory: Path, name: str = "deflated") -> Path:
    """8-bit MONOCHROME2, Deflated Explicit VR Little Endian (the whole data set zlib'd)."""
    return write_mono(
        directory, name, transfer_syntax_uid=dicom_uid.DeflatedExplicitVRLittleEndian
    )


def write_rle_lossless(directory: Path, name: str = "rle", *, bits_stored: int = 8) -> Path:
    """MONOCHROME2 RLE Lossless (8-bit, or 16 allocated for ``bits_stored`` > 8)."""
    return write_mono(
        directory, name, bits_stored=bits_stored, transfer_syntax_uid=dicom_uid.RLELossless
    )


def write_jpeg2000_lossless(
    directory: Path, name: str = "jpeg2000", *, bits_stored: int = 12
) -> Path:
    """MONOCHROME2 JPEG 2000 Lossless (1.2.840.10008.1.2.4.90), 12-bit by default."""
    return write_mono(
        directory, name, bits_stored=bits_stored,
        transfer_syntax_uid=dicom_uid.JPEG2000Lossless,
    )


def write_jpegls_lossless(directory: Path, name: str = "jpegls", *, bits_stored: int = 12) -> Path:
    """MONOCHROME2 JPEG-LS Lossless (1.2.840.10008.1.2.4.80), 12-bit by default.

    Skips the calling test when no JPEG-LS encoder (``pyjpegls``) is installed.
    """
    if not jpegls_encoder_available():
        pytest.skip("no JPEG-LS encoder: install pyjpegls to write JPEG-LS test files")
    return write_mono(
        directory, name, bits_stored=bits_stored, transfer_syntax_uid=dicom_uid.JPEGLSLossless
    )


# --------------------------------------------------------------------------- pixel semantics


def write_12bit_rescale(directory: Path, name: str = "mono12_rescale") -> Path:
    """12-bit MONOCHROME2 with RescaleSlope/Intercept and one WindowCenter/Width."""
    return write_mono(
        directory, name, bits_stored=12,
        attributes={
            "RescaleSlope": "0.5",
            "RescaleIntercept": "-100",
            "RescaleType": "US",
            "WindowCenter": "900",
            "WindowWidth": "1600",
        },
    )


def write_16bit_rescale(directory: Path, name: str = "mono16_rescale") -> Path:
    """16-bit MONOCHROME2 with rescale and two window presets (multi-valued WC/WW)."""
    return write_mono(
        directory, name, bits_stored=16,
        attributes={
            "RescaleSlope": "0.25",
            "RescaleIntercept": "10",
            "WindowCenter": ["8000", "9000"],
            "WindowWidth": ["12000", "4000"],
            "WindowCenterWidthExplanation": ["NORMAL", "HARD"],
        },
    )


def write_16bit_voi_lut(
    directory: Path, name: str = "mono16_voi_lut", *, with_window: bool = False
) -> Path:
    """16-bit MONOCHROME2 with a VOI LUT Sequence (a sigmoid LUT; pixels beyond it clamp).

    Stored values span 500..4000; the LUT maps 1000..3047 (2048 entries, 16-bit output),
    so values below and above it take the first and last entry. ``with_window`` also
    writes a WindowCenter/Width, which a VOI LUT takes precedence over.
    """
    first, entries = 1000, 2048
    x = np.linspace(-4.0, 4.0, entries)
    lut = np.round(65535.0 / (1.0 + np.exp(-x))).astype(np.uint16)
    item = Dataset()
    item.add(DataElement(0x00283002, "US", [entries, first, 16]))  # LUTDescriptor
    item.LUTExplanation = "SIGMOID"
    item.add(DataElement(0x00283006, "US", [int(v) for v in lut]))  # LUTData
    attributes: dict[str, object] = {"VOILUTSequence": [item]}
    if with_window:
        attributes |= {"WindowCenter": "2000", "WindowWidth": "3000"}
    return write_mono(
        directory, name, bits_stored=16,
        pixels=pattern(low=500, high=4000, dtype=np.uint16), attributes=attributes,
    )


def write_monochrome1(directory: Path, name: str = "mono1") -> Path:
    """12-bit MONOCHROME1 (0 is white) with a window: the decoder must invert it."""
    return write_mono(
        directory, name, bits_stored=12, photometric="MONOCHROME1",
        attributes={"WindowCenter": "2048", "WindowWidth": "4096"},
    )


def write_signed_16bit(
    directory: Path, name: str = "signed16", *, bits_stored: int = 16, sign_extended: bool = True
) -> Path:
    """Signed (PixelRepresentation 1) MONOCHROME2, 16 allocated, values around zero.

    Args:
        directory: Folder to write into.
        name: File stem.
        bits_stored: 16, or e.g. 12 for a 12-bit signed range in 16-bit words.
        sign_extended: If False (with ``bits_stored`` < 16), the bits above HighBit are
            zero as some modalities write them: reading the words as int16 is then wrong.
    """
    half = 2 ** (bits_stored - 1)
    values = pattern(low=-half, high=half - 1, dtype=np.int16)
    if not sign_extended:
        values = (values.astype(np.uint16) & np.uint16(2**bits_stored - 1)).view(np.int16)
    return write_mono(
        directory, name, bits_stored=bits_stored, signed=True, pixels=values,
        attributes={"RescaleSlope": "1", "RescaleIntercept": "0"},
    )


def write_rgb(directory: Path, name: str = "rgb", *, planar_configuration: int = 0) -> Path:
    """8-bit RGB (SamplesPerPixel 3), colour-by-pixel (0) or colour-by-plane (1)."""
    if planar_configuration not in (0, 1):
        raise ValueError(f"planar_configuration={planar_configuration!r}: allowed 0, 1")
    rgb = np.stack(
        [pattern(seed=0), pattern(seed=1)[::-1], 255 - pattern(seed=2)], axis=-1
    ).astype(np.uint8)
    ds = _dataset(name, ROWS, COLS, dicom_uid.ExplicitVRLittleEndian)
    _set_pixels(ds, rgb, photometric="RGB", bits_stored=8)
    ds.PlanarConfiguration = planar_configuration
    if planar_configuration == 1:
        ds.PixelData = np.ascontiguousarray(rgb.transpose(2, 0, 1)).tobytes()
    return _save(ds, _path(directory, name))


def write_palette_color(directory: Path, name: str = "palette") -> Path:
    """8-bit PALETTE COLOR with 256-entry, 16-bit red/green/blue LUTs."""
    ds = _dataset(name, ROWS, COLS, dicom_uid.ExplicitVRLittleEndian)
    _set_pixels(ds, pattern(), photometric="PALETTE COLOR", bits_stored=8)
    ramp = np.arange(256, dtype=np.uint16) * 257
    luts = {
        "Red": ramp,
        "Green": ramp[::-1].copy(),
        "Blue": np.round(32767.5 + 32767.5 * np.sin(np.arange(256) / 20.0)).astype(np.uint16),
    }
    # (0028,1101..1103) descriptors, (0028,1201..1203) data, in red, green, blue order. The
    # descriptor's VR is ambiguous (US or SS) in the dictionary: set it explicitly.
    for i, lut in enumerate(luts.values()):
        ds.add(DataElement(0x00281101 + i, "US", [256, 0, 16]))
        ds.add(DataElement(0x00281201 + i, "OW", lut.astype("<u2").tobytes()))
    return _save(ds, _path(directory, name))


def write_multiframe(directory: Path, name: str = "multiframe", *, frames: int = 3) -> Path:
    """8-bit MONOCHROME2 with NumberOfFrames ``frames`` (each frame different)."""
    return write_mono(directory, name, frames=frames)


# --------------------------------------------------------------------------- broken and odd files


def write_truncated(directory: Path, name: str = "truncated", *, compressed: bool = False) -> Path:
    """A valid DICOM cut in the middle of its pixel data.

    Args:
        directory: Folder to write into.
        name: File stem.
        compressed: Cut a JPEG Baseline file inside its fragment instead of an
            uncompressed 8-bit one.
    """
    path = _path(directory, name)
    if compressed:
        write_jpeg_baseline(directory, name)
    else:
        write_explicit_le_8bit(directory, name)
    data = path.read_bytes()
    if compressed:
        # Encapsulated pixel data ends with the one fragment, then an 8-byte sequence
        # delimiter: cut half-way into the fragment.
        fragment = next(generate_frames(dcmread(path).PixelData, number_of_frames=1))
        cut = len(data) - 8 - len(fragment) // 2
    else:
        cut = len(data) - (ROWS * COLS) // 2  # pixel data is the last element
    path.write_bytes(data[:cut])
    return path


def write_not_dicom(directory: Path, name: str = "not_dicom", *, kind: str = "bytes") -> Path:
    """A file named ``.dcm`` that is not DICOM: ``bytes`` (seeded random), ``text`` or ``empty``."""
    contents = {
        "bytes": np.random.default_rng(0).bytes(3000),
        "text": b"patientId,x,y,width,height,Target\nnot a DICOM file, just text\n",
        "empty": b"",
    }
    if kind not in contents:
        raise ValueError(f"kind={kind!r}: allowed {sorted(contents)}")
    path = _path(directory, name)
    path.write_bytes(contents[kind])
    return path


def write_no_pixel_data(directory: Path, name: str = "no_pixels") -> Path:
    """A CR header (Rows, Columns, pixel module) with no PixelData element."""
    ds = _dataset(name, ROWS, COLS, dicom_uid.ExplicitVRLittleEndian)
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    return _save(ds, _path(directory, name))


SR_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.11"
"""Basic Text SR Storage."""
PR_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.11.1"
"""Grayscale Softcopy Presentation State Storage."""
KO_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.88.59"
"""Key Object Selection Document Storage."""


def write_non_image(directory: Path, name: str, sop_class_uid: str, modality: str) -> Path:
    """A header-only object of a non-image storage class (SR, PR, KO): no pixel module."""
    ds = _dataset(name, ROWS, COLS, dicom_uid.ExplicitVRLittleEndian)
    del ds.Rows, ds.Columns, ds.ViewPosition
    ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.SOPClassUID = sop_class_uid
    ds.Modality = modality
    return _save(ds, _path(directory, name))


def with_sop_class(path: Path, sop_class_uid: str | None) -> Path:
    """Rewrite ``path`` in place as another SOP class; None removes the class from the
    dataset and the file meta (a file judged by its pixel data)."""
    ds = dcmread(path)
    if sop_class_uid is None:
        del ds.SOPClassUID
        del ds.file_meta.MediaStorageSOPClassUID
    else:
        ds.SOPClassUID = sop_class_uid
        ds.file_meta.MediaStorageSOPClassUID = sop_class_uid
    ds.save_as(path, enforce_file_format=sop_class_uid is not None)
    return path


def write_uid_named(directory: Path, name: str = DEFAULT_UID_NAME) -> Path:
    """An RSNA-like JPEG Baseline DICOM whose file name is a dotted UID with no suffix.

    ``Path.suffix`` of such a name is ``.1``-like and ``Path.stem`` cuts it: the file is
    found only by its preamble (128 bytes then ``DICM``).
    """
    return write_dicom(
        _path(directory, name, suffix=""), pattern(), patient_id=name.replace(".", "-"),
        transfer_syntax="jpeg_baseline",
    )


def make_rsna_like(
    path: Path, patient_id: str, rows: int = 64, cols: int = 64, seed: int = 0
) -> Path:
    """Write one synthetic RSNA-like chest X-ray (JPEG Baseline CR) to ``path``.

    Args:
        path: File to write (its folder is created).
        patient_id: PatientID (RSNA: the file stem).
        rows: Number of rows.
        cols: Number of columns; a non-square image is a centre crop of a square one.
        seed: Seed of the image and of the derived UIDs.

    Returns:
        ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    size = max(rows, cols, 32)
    image, _ = synthetic_chest(size, seed=seed)
    top, left = (size - rows) // 2, (size - cols) // 2
    crop = np.ascontiguousarray(image[top : top + rows, left : left + cols])
    return write_dicom(path, crop, patient_id=patient_id, uid_seed=str(seed))


# --------------------------------------------------------------------------- hostile files


def frame_span(path: Path) -> tuple[int, int]:
    """(offset, length) in the file of the single encapsulated frame of ``path``."""
    data = Path(path).read_bytes()
    frame = next(generate_frames(dcmread(path).PixelData, number_of_frames=1))
    at = data.rfind(frame)
    if at < 0:
        raise ValueError(f"{path}: frame is split over fragments")
    return at, len(frame)


def damage_frame(path: Path, n_bytes: int) -> Path:
    """Zero ``n_bytes`` in the middle of the single encapsulated frame of ``path``, in place
    (a damaged copy: the file still parses, the codestream does not)."""
    at, length = frame_span(path)
    if length < n_bytes + 1000:
        raise ValueError(f"{path}: frame of {length} bytes is too small to lose {n_bytes} in its middle")
    data = bytearray(Path(path).read_bytes())
    mid = at + (length - n_bytes) // 2
    data[mid : mid + n_bytes] = bytes(n_bytes)
    Path(path).write_bytes(bytes(data))
    return path


def patch_frame_size(path: Path, rows: int, cols: int) -> Path:
    """Rewrite the size in a JPEG SOF or JPEG 2000 SIZ header of ``path``'s frame, in place;
    the DICOM Rows/Columns stay as they are."""
    at, _ = frame_span(path)
    data = bytearray(Path(path).read_bytes())
    if data[at : at + 4] == b"\xff\x4f\xff\x51":  # JPEG 2000: Xsiz, Ysiz after Lsiz + Rsiz
        siz = at + 2
        x_off, y_off = struct.unpack_from(">II", data, siz + 14)
        struct.pack_into(">II", data, siz + 6, cols + x_off, rows + y_off)
    else:
        pos = at + 2
        while data[pos + 1] not in (0xC0, 0xC1, 0xC2, 0xC3, 0xF7):
            pos += 2 + struct.unpack_from(">H", data, pos + 2)[0]
        struct.pack_into(">HH", data, pos + 5, rows, cols)
    Path(path).write_bytes(bytes(data))
    return path


def write_deflate_bomb(directory: Path, name: str = "deflate_bomb", *, rows: int = 24000, cols: int = 24000, header_rows: int | None = None) -> Path:
    """A Deflated Explicit VR file of about 1 MB whose dataset inflates to ``rows`` x ``cols``
    16-bit zeros (24000 x 24000: 1.15 GB).

    The header says ``header_rows`` x ``header_rows`` if given (a lie: the pixel data is still
    ``rows`` x ``cols``), else the truth. The deflate stream is built from one compressed
    block of zero rows repeated (each ends in a full flush, so the copies are identical),
    which takes well under a second.
    """
    shown = (header_rows, header_rows) if header_rows else (rows, cols)
    ds = _dataset(name, *shown, dicom_uid.DeflatedExplicitVRLittleEndian)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    body = DicomBytesIO()
    body.is_little_endian, body.is_implicit_VR = True, False
    write_dataset(body, ds)
    pixel_bytes = rows * cols * 2
    header = body.getvalue() + struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes)
    block_rows = next(n for n in range(min(rows, 500), 0, -1) if rows % n == 0)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    head = z.compress(header) + z.flush(zlib.Z_FULL_FLUSH)
    block = z.compress(bytes(block_rows * cols * 2)) + z.flush(zlib.Z_FULL_FLUSH)
    tail = z.flush()
    meta = DicomBytesIO()
    meta.is_little_endian, meta.is_implicit_VR = True, False
    write_file_meta_info(meta, ds.file_meta, enforce_standard=True)
    path = _path(directory, name)
    with open(path, "wb") as f:
        f.write(b"\x00" * 128 + b"DICM" + meta.getvalue() + head)
        for _ in range(rows // block_rows):
            f.write(block)
        f.write(tail)
    return path


# --------------------------------------------------------------------------- the table


@dataclass(frozen=True)
class FactoryCase:
    """One kind of file, for parameter tables in decoder tests."""

    name: str
    write: Callable[[Path], Path]
    """Writes the file into the given folder and returns its path."""
    is_dicom: bool
    """``pydicom.dcmread`` (without force) reads it."""
    decodes: bool
    """pydicom's ``pixel_array`` returns the pixels; False means the decoder must reject it."""


CASES: tuple[FactoryCase, ...] = (
    FactoryCase("jpeg_baseline", write_jpeg_baseline, True, True),
    FactoryCase("explicit_le_8bit", write_explicit_le_8bit, True, True),
    FactoryCase("implicit_le", write_implicit_le, True, True),
    FactoryCase("explicit_be", write_explicit_be, True, True),
    FactoryCase("deflated", write_deflated, True, True),
    FactoryCase("rle", write_rle_lossless, True, True),
    FactoryCase("rle_16", lambda d: write_rle_lossless(d, "rle_16", bits_stored=16), True, True),
    FactoryCase("jpeg2000", write_jpeg2000_lossless, True, True),
    FactoryCase("jpegls", write_jpegls_lossless, True, True),
    FactoryCase("mono12_rescale", write_12bit_rescale, True, True),
    FactoryCase("mono16_rescale", write_16bit_rescale, True, True),
    FactoryCase("mono16_voi_lut", write_16bit_voi_lut, True, True),
    FactoryCase("mono1", write_monochrome1, True, True),
    FactoryCase("signed16", write_signed_16bit, True, True),
    FactoryCase(
        "signed12_raw",
        lambda d: write_signed_16bit(d, "signed12_raw", bits_stored=12, sign_extended=False),
        True,
        True,
    ),
    FactoryCase("rgb", write_rgb, True, True),
    FactoryCase("palette", write_palette_color, True, True),
    FactoryCase("multiframe", write_multiframe, True, True),
    FactoryCase("uid_named", write_uid_named, True, True),
    FactoryCase("rsna_like", lambda d: make_rsna_like(Path(d) / "rsna.dcm", "rsna"), True, True),
    FactoryCase("truncated", write_truncated, True, False),
    FactoryCase(
        "truncated_jpeg",
        lambda d: write_truncated(d, "truncated_jpeg", compressed=True),
        True,
        False,
    ),
    FactoryCase("no_pixels", write_no_pixel_data, True, False),
    FactoryCase("not_dicom_bytes", write_not_dicom, False, False),
    FactoryCase(
        "not_dicom_text", lambda d: write_not_dicom(d, "not_dicom_text", kind="text"), False, False
    ),
    FactoryCase(
        "not_dicom_empty",
        lambda d: write_not_dicom(d, "not_dicom_empty", kind="empty"),
        False,
        False,
    ),
)
"""Every kind of file above, each with its default name, and what pydicom makes of it."""
