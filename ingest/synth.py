"""Synthetic RSNA-like data set: chest-X-ray-looking DICOMs plus RSNA label CSVs.

``python -m ingest.synth --out DIR --n N [--seed S] [--size 1024]`` writes::

    DIR/images/<patientId>.dcm            8-bit MONOCHROME2, JPEG Baseline, Modality CR
    DIR/stage_2_train_labels.csv          patientId,x,y,width,height,Target
    DIR/stage_2_detailed_class_info.csv   patientId,class

The images are drawn, not sampled from real data: a dark background, a bright torso with
spine, heart and ribs, two darker lung fields, smooth low-frequency texture and noise. A
positive gets 1-4 soft opacities, clearly brighter than the lung around them, each inside
its box. Everything, UIDs included, derives from the seed: the same seed gives byte-identical
files.

Generation draws every random parameter first (:func:`_draw_case`) and then renders with a
pure function (:func:`_render`), so the rendering itself holds no randomness.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import logging
import math
import shutil
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from pydicom import config as dicom_config
from pydicom import uid as dicom_uid
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from tqdm import tqdm

from ingest.config import IngestConfig
from shards.atomic import atomic_write_bytes
from shards.cli import EXIT_USAGE, configure_logging
from shards.format import CLASS_NAMES

log = logging.getLogger(__name__)

__all__ = [
    "CR_SOP_CLASS_UID",
    "TRANSFER_SYNTAXES",
    "SynthConfig",
    "SynthRecord",
    "SynthIngested",
    "SynthSummary",
    "derived_uid",
    "main",
    "make_dataset",
    "make_ingested",
    "synthetic_chest",
    "write_dicom",
]

CR_SOP_CLASS_UID = "1.2.840.10008.5.1.4.1.1.1"
"""Computed Radiography Image Storage, the SOP class of every RSNA file."""

TRANSFER_SYNTAXES: dict[str, str] = {
    "jpeg_baseline": dicom_uid.JPEGBaseline8Bit,
    "explicit_vr_little_endian": dicom_uid.ExplicitVRLittleEndian,
    "implicit_vr_little_endian": dicom_uid.ImplicitVRLittleEndian,
    "explicit_vr_big_endian": dicom_uid.ExplicitVRBigEndian,
    "deflated_explicit_vr_little_endian": dicom_uid.DeflatedExplicitVRLittleEndian,
    "rle_lossless": dicom_uid.RLELossless,
    "jpeg2000_lossless": dicom_uid.JPEG2000Lossless,
    "jpegls_lossless": dicom_uid.JPEGLSLossless,
}
"""Names accepted by :func:`write_dicom`'s ``transfer_syntax``, mapped to their UIDs."""

# Lossless compressions that pydicom's own encoders (``Dataset.compress``) produce.
_POST_COMPRESSED = frozenset({"rle_lossless", "jpeg2000_lossless", "jpegls_lossless"})


LABELS_CSV = "stage_2_train_labels.csv"
CLASS_INFO_CSV = "stage_2_detailed_class_info.csv"

_IMPLEMENTATION_VERSION = "PNEUMO_SYNTH_1"  # SH: at most 16 characters
_REFERENCE_SIZE = 1024  # box sizes and pixel spacing are stated at RSNA's 1024 px
_N_BASES = 4  # anatomies rendered once per data set; each image warps one of them
_NOISE_SIGMA = 0.012  # quantum-ish noise, in units of full scale
_BOX_COUNT_P = (0.40, 0.55, 0.04, 0.01)  # RSNA's mix of 1, 2, 3, 4 boxes per positive

Box = tuple[float, float, float, float]
"""A box as RSNA writes it: x, y (top-left), width, height in source pixels."""

Ellipse = tuple[float, float, float, float]
"""A lung field: centre x, centre y, semi-axis x, semi-axis y, in source pixels."""


def derived_uid(*parts: str) -> str:
    """Return a DICOM UID under the UUID root ``2.25`` that is a pure function of ``parts``.

    Args:
        parts: Strings that identify the object (for example a patient id and a role).

    Returns:
        A UID such as ``2.25.1234...`` of at most 44 characters; equal parts give equal UIDs.
    """
    digest = hashlib.sha256("\x1f".join(("pneumo-hpc", *parts)).encode()).digest()
    return f"2.25.{uuid.UUID(bytes=digest[:16], version=4).int}"


@dataclass(frozen=True, kw_only=True)
class SynthConfig:
    """What :func:`make_dataset` generates."""

    n: int
    """Number of images (patients) to write."""
    seed: int = 0
    """Seed of the one ``np.random.Generator`` that every random choice is drawn from."""
    size: int = 1024
    """Rows and columns of each image (RSNA: 1024); box sizes scale with it."""
    positive_fraction: float = 0.22
    """Fraction of patients with Target 1 (RSNA: about 22%)."""
    not_normal_fraction: float = 0.55
    """Fraction of the negatives labelled 'No Lung Opacity / Not Normal' (the rest 'Normal')."""
    quality: int = 90
    """JPEG quality passed to OpenCV."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n={self.n!r}: need at least 1 image")
        if not 32 <= self.size <= 8192:
            raise ValueError(f"size={self.size!r}: allowed 32..8192 pixels")
        if not 0.0 <= self.positive_fraction <= 1.0:
            raise ValueError(f"positive_fraction={self.positive_fraction!r}: allowed 0..1")
        if not 0.0 <= self.not_normal_fraction <= 1.0:
            raise ValueError(f"not_normal_fraction={self.not_normal_fraction!r}: allowed 0..1")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"quality={self.quality!r}: allowed 1..100")


@dataclass(frozen=True)
class SynthRecord:
    """One generated patient: what its labels say and where its DICOM is."""

    patient_id: str
    path: Path
    target: int
    class_name: str
    boxes: tuple[Box, ...]
    """Boxes in source pixels as x, y, width, height; empty for a negative."""
    view_position: str
    sex: str
    age: str
    lungs: tuple[Ellipse, Ellipse]
    """The two lung fields as drawn (ground-truth anatomy, for tests and demos)."""


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`make_dataset` wrote."""

    out: Path
    images_dir: Path
    labels_csv: Path
    class_info_csv: Path
    size: int
    n_images: int
    n_positive: int
    n_boxes: int
    class_counts: dict[str, int]
    records: tuple[SynthRecord, ...] = field(repr=False)

    def ingest_config(self, out: Path, **options: Any) -> IngestConfig:
        """The configuration that ingests this set (its images, labels and class info) into
        ``out``, without a progress bar; ``options`` are further :class:`IngestConfig` fields
        (and may override those)."""
        inputs = {"dicom_dir": self.images_dir, "labels": self.labels_csv, "class_info": self.class_info_csv,
                  "progress": False}
        return IngestConfig(**{**inputs, **options, "out": Path(out)})


@dataclass(frozen=True)
class _Base:
    """An anatomy rendered once per data set, in [0, 1] float32, and its lung fields."""

    image: np.ndarray
    lungs: tuple[Ellipse, Ellipse]


@dataclass(frozen=True)
class _Opacity:
    box: Box
    amplitude: float
    patchiness: np.ndarray  # small float32 grid in [0.7, 1], upsampled over the box


@dataclass(frozen=True)
class _Case:
    """Every random parameter of one image, drawn before any rendering."""

    base: int
    scale: float
    shift: tuple[float, float]
    gain: float
    offset: float
    texture: np.ndarray  # (8, 8) float32, upsampled to the image
    noise_offset: tuple[int, int]
    lungs: tuple[Ellipse, Ellipse]  # after the warp
    opacities: tuple[_Opacity, ...]


# --------------------------------------------------------------------------- rendering


def _soft_ellipse(
    u: np.ndarray, v: np.ndarray, cx: float, cy: float, a: float, b: float, edge: float
) -> np.ndarray:
    """Return a float32 mask, 1 inside the ellipse and falling smoothly to 0 outside."""
    r = np.sqrt(((u - cx) / a) ** 2 + ((v - cy) / b) ** 2)
    # Clip the exponent: far outside, exp would overflow float32 (the mask is 0 there anyway).
    return (1.0 / (1.0 + np.exp(np.minimum((r - 1.0) / edge, 60.0)))).astype(np.float32)


def _render_base(size: int, rng: np.random.Generator) -> _Base:
    """Draw one anatomy's parameters from ``rng`` and render it at ``size`` x ``size``."""
    dx = rng.uniform(0.165, 0.19)
    cy = rng.uniform(0.45, 0.49)
    a = rng.uniform(0.13, 0.15)
    b = rng.uniform(0.27, 0.30)
    heart = (rng.uniform(0.54, 0.57), rng.uniform(0.62, 0.66), rng.uniform(0.11, 0.14))
    n_ribs = rng.uniform(9.0, 11.0)
    rib_curve = rng.uniform(0.8, 1.4)

    coords = (np.arange(size, dtype=np.float32) + 0.5) / size
    u = coords[None, :]
    v = coords[:, None]
    edge = 0.035
    torso = _soft_ellipse(u, v, 0.5, 0.66, 0.47, 0.66, edge)
    neck = _soft_ellipse(u, v, 0.5, 0.02, 0.09, 0.12, edge)
    body = np.maximum(torso, neck)
    lungs = np.maximum(
        _soft_ellipse(u, v, 0.5 - dx, cy, a, b, 0.035),
        _soft_ellipse(u, v, 0.5 + dx, cy, a, b, 0.035),
    )
    heart_mask = _soft_ellipse(u, v, heart[0], heart[1], heart[2], heart[2] * 0.95, 0.08)
    spine = np.exp(-(((u - 0.5) / 0.035) ** 2)).astype(np.float32) * body
    # Ribs: arcs across each lung, highest mid-lung and falling towards both of its edges.
    lung_cx = np.where(u < 0.5, 0.5 - dx, 0.5 + dx)
    phase = n_ribs * (v - rib_curve * 0.07 * ((u - lung_cx) / a) ** 2)
    ribs = np.clip(np.sin(2.0 * np.pi * phase), 0.0, 1.0) ** 2

    img = 0.05 + 0.58 * body
    img -= 0.34 * lungs
    img += 0.08 * ribs * lungs
    img += 0.15 * heart_mask * lungs  # the heart shadow over the inner lung
    img += 0.12 * spine
    image = np.clip(img, 0.0, 1.0).astype(np.float32)
    left = ((0.5 - dx) * size, cy * size, a * size, b * size)
    right = ((0.5 + dx) * size, cy * size, a * size, b * size)
    return _Base(image=image, lungs=(left, right))


def _draw_boxes(
    rng: np.random.Generator, lungs: tuple[Ellipse, Ellipse], n_boxes: int, size: int
) -> list[Box]:
    """Draw ``n_boxes`` RSNA-sized boxes inside the lung fields (integer pixel values)."""
    if n_boxes == 1:
        sides = [int(rng.integers(2))]
    else:
        first = int(rng.integers(2))
        sides = [(first + i) % 2 for i in range(n_boxes)]
    unit = size / _REFERENCE_SIZE
    boxes: list[Box] = []
    for side in (0, 1):
        k = sides.count(side)
        if k == 0:
            continue
        cx, cy, a, b = lungs[side]
        top, bottom = cy - 0.85 * b, cy + 0.85 * b
        band = (bottom - top) / k
        for j in range(k):
            w = min(rng.uniform(140.0, 300.0) * unit, 1.7 * a)
            h = min(rng.uniform(160.0, 400.0) * unit, band)
            x0 = cx + rng.uniform(-0.3, 0.3) * a - w / 2
            lo, hi = top + j * band, top + (j + 1) * band - h
            y0 = rng.uniform(lo, max(lo, hi))
            # Keep the box on the image (w and h are far below the image size).
            w, h = max(2, round(w)), max(2, round(h))
            x0 = min(max(0, round(x0)), size - w)
            y0 = min(max(0, round(y0)), size - h)
            boxes.append((float(x0), float(y0), float(w), float(h)))
    return boxes


def _draw_case(
    rng: np.random.Generator, bases: Sequence[_Base], *, n_boxes: int, size: int
) -> _Case:
    """Draw every random parameter of one image from ``rng``; renders nothing."""
    base = int(rng.integers(len(bases)))
    scale = float(rng.uniform(0.94, 1.05))
    shift = (float(rng.uniform(-0.03, 0.03) * size), float(rng.uniform(-0.03, 0.03) * size))
    tx = (1.0 - scale) * size / 2 + shift[0]
    ty = (1.0 - scale) * size / 2 + shift[1]

    def warped(lung: Ellipse) -> Ellipse:
        cx, cy, a, b = lung
        return (scale * cx + tx, scale * cy + ty, scale * a, scale * b)

    lungs = (warped(bases[base].lungs[0]), warped(bases[base].lungs[1]))
    texture = (rng.standard_normal((8, 8)) * 0.035).astype(np.float32)
    pad = size // 2
    noise_offset = (int(rng.integers(pad + 1)), int(rng.integers(pad + 1)))
    opacities = tuple(
        _Opacity(
            box=box,
            amplitude=float(rng.uniform(0.30, 0.45)),
            patchiness=rng.uniform(0.7, 1.0, (4, 4)).astype(np.float32),
        )
        for box in _draw_boxes(rng, lungs, n_boxes, size)
    )
    return _Case(
        base=base,
        scale=scale,
        shift=shift,
        gain=float(rng.uniform(0.9, 1.1)),
        offset=float(rng.uniform(-0.03, 0.03)),
        texture=texture,
        noise_offset=noise_offset,
        lungs=lungs,
        opacities=opacities,
    )


def _add_opacity(img: np.ndarray, op: _Opacity) -> None:
    """Add a soft Gaussian blob filling ``op.box`` (box edge = 2 sigma) to ``img`` in place."""
    x, y, w, h = op.box
    cx, cy, sx, sy = x + w / 2, y + h / 2, w / 4, h / 4
    rows, cols = img.shape
    # Draw a little past the box so the blob fades out instead of stopping at its edge.
    x0, x1 = max(0, int(x - w / 4)), min(cols, int(math.ceil(x + w + w / 4)))
    y0, y1 = max(0, int(y - h / 4)), min(rows, int(math.ceil(y + h + h / 4)))
    xs = ((np.arange(x0, x1, dtype=np.float32) + 0.5 - cx) / sx) ** 2
    ys = ((np.arange(y0, y1, dtype=np.float32) + 0.5 - cy) / sy) ** 2
    blob = np.exp(-0.5 * (ys[:, None] + xs[None, :]))
    patch = cv2.resize(op.patchiness, (x1 - x0, y1 - y0), interpolation=cv2.INTER_CUBIC)
    img[y0:y1, x0:x1] += op.amplitude * blob * patch


def _render(case: _Case, bases: Sequence[_Base], noise: np.ndarray, size: int) -> np.ndarray:
    """Render one image from its drawn parameters; pure apart from reading its inputs.

    Returns:
        A (size, size) uint8 array.
    """
    tx = (1.0 - case.scale) * size / 2 + case.shift[0]
    ty = (1.0 - case.scale) * size / 2 + case.shift[1]
    warp = np.array([[case.scale, 0.0, tx], [0.0, case.scale, ty]], dtype=np.float32)
    img = cv2.warpAffine(
        bases[case.base].image, warp, (size, size),
        flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE,
    )
    img += cv2.resize(case.texture, (size, size), interpolation=cv2.INTER_CUBIC)
    for op in case.opacities:
        _add_opacity(img, op)
    img *= case.gain
    img += case.offset
    oy, ox = case.noise_offset
    img += noise[oy : oy + size, ox : ox + size]
    np.clip(img, 0.0, 1.0, out=img)
    img *= 255.0
    img += 0.5
    return img.astype(np.uint8)


def _noise_tile(rng: np.random.Generator, size: int) -> np.ndarray:
    """Draw one noise field 1.5x the image; each image reads a window at its own offset."""
    pad = size // 2
    return (rng.standard_normal((size + pad, size + pad), dtype=np.float32) * _NOISE_SIGMA)


def synthetic_chest(
    size: int = 256, *, seed: int = 0, n_opacities: int = 0
) -> tuple[np.ndarray, list[Box]]:
    """Render one chest-X-ray-like image, with ``n_opacities`` opacities and their boxes.

    Args:
        size: Rows and columns of the image.
        seed: Seed of the generator every parameter is drawn from.
        n_opacities: Number of opacities (0 for a negative, at most 4).

    Returns:
        The (size, size) uint8 image and its boxes as (x, y, width, height) in pixels.

    Raises:
        ValueError: If ``size`` is below 32 or ``n_opacities`` is not in 0..4.
    """
    if size < 32:
        raise ValueError(f"size={size!r}: allowed 32 or more pixels")
    if not 0 <= n_opacities <= 4:
        raise ValueError(f"n_opacities={n_opacities!r}: allowed 0..4")
    rng = np.random.default_rng(seed)
    bases = [_render_base(size, rng)]
    noise = _noise_tile(rng, size)
    case = _draw_case(rng, bases, n_boxes=n_opacities, size=size)
    return _render(case, bases, noise, size), [op.box for op in case.opacities]


# --------------------------------------------------------------------------- DICOM


def _age_element(age: str) -> DataElement:
    # RSNA's ages are bare numbers ('43'), which VR AS does not allow ('043Y'); write them
    # as RSNA does without pydicom's validation warning.
    return DataElement(0x00101010, "AS", age, validation_mode=dicom_config.IGNORE)


def write_dicom(
    path: Path | str,
    pixels: np.ndarray,
    *,
    patient_id: str,
    view_position: str = "PA",
    sex: str = "M",
    age: str = "43",
    transfer_syntax: str = "jpeg_baseline",
    quality: int = 90,
    uid_seed: str = "",
) -> Path:
    """Write an 8-bit MONOCHROME2 CR image as an RSNA-style DICOM file.

    The header mirrors the RSNA challenge files (anonymised dates, ``PatientName`` =
    ``PatientID`` = the patient id, non-conformant ``PatientAge``); all UIDs derive from
    ``patient_id`` and ``uid_seed``, so the same inputs give byte-identical files. The file
    is written under a temporary name and renamed into place.

    Args:
        path: File to write (any name; a UID-like name without suffix is fine).
        pixels: 2-D uint8 array (rows, columns).
        patient_id: Written to ``PatientID`` and ``PatientName``.
        view_position: ``PA`` or ``AP``.
        sex: ``M``, ``F`` or ``O``.
        age: ``PatientAge`` as RSNA writes it, e.g. ``'43'``.
        transfer_syntax: A key of :data:`TRANSFER_SYNTAXES`.
        quality: JPEG quality for ``jpeg_baseline``.
        uid_seed: Extra entropy for the derived UIDs (e.g. the data set's seed).

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``pixels`` is not a non-empty 2-D uint8 array or an option is not
            one of its allowed values.
    """
    path = Path(path)
    if pixels.ndim != 2 or pixels.dtype != np.uint8 or pixels.size == 0:
        raise ValueError(
            f"pixels: need a non-empty 2-D uint8 array, got shape {pixels.shape} {pixels.dtype}"
        )
    if view_position not in ("PA", "AP"):
        raise ValueError(f"view_position={view_position!r}: allowed 'PA', 'AP'")
    if sex not in ("M", "F", "O"):
        raise ValueError(f"sex={sex!r}: allowed 'M', 'F', 'O'")
    if transfer_syntax not in TRANSFER_SYNTAXES:
        raise ValueError(
            f"transfer_syntax={transfer_syntax!r}: allowed {sorted(TRANSFER_SYNTAXES)}"
        )
    if not 1 <= quality <= 100:
        raise ValueError(f"quality={quality!r}: allowed 1..100")
    rows, cols = pixels.shape
    sop_uid = derived_uid(uid_seed, patient_id, "sop")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_SOP_CLASS_UID
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = (
        dicom_uid.ExplicitVRLittleEndian
        if transfer_syntax in _POST_COMPRESSED
        else TRANSFER_SYNTAXES[transfer_syntax]
    )
    meta.ImplementationClassUID = derived_uid("ingest.synth", "implementation")
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION

    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = CR_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = "19010101"
    ds.StudyTime = "000000.00"
    ds.AccessionNumber = ""
    ds.Modality = "CR"
    ds.ConversionType = "WSD"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = f"view: {view_position}"
    ds.PatientName = patient_id
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = sex
    ds.add(_age_element(age))
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = view_position
    ds.StudyInstanceUID = derived_uid(uid_seed, patient_id, "study")
    ds.SeriesInstanceUID = derived_uid(uid_seed, patient_id, "series")
    ds.StudyID = ""
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.PatientOrientation = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    spacing = f"{0.143 * _REFERENCE_SIZE / max(rows, cols):.6g}"
    ds.PixelSpacing = [spacing, spacing]
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0

    if transfer_syntax == "jpeg_baseline":
        ok, encoded = cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"OpenCV could not JPEG-encode the image for {path}")
        ds.LossyImageCompression = "01"
        ds.LossyImageCompressionMethod = "ISO_10918_1"
        ds.PixelData = encapsulate([encoded.tobytes()])
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    else:
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        ds["PixelData"].VR = "OB"
        if transfer_syntax in _POST_COMPRESSED:
            # generate_instance_uid=False keeps the derived (deterministic) SOP instance UID.
            ds.compress(TRANSFER_SYNTAXES[transfer_syntax], generate_instance_uid=False)

    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    atomic_write_bytes(path, buffer.getvalue(), durable=False)
    return path


# --------------------------------------------------------------------------- data set


def _patient_ids(rng: np.random.Generator, n: int) -> list[str]:
    """Draw ``n`` distinct uuid4-formatted ids (RSNA's patientId form) from ``rng``."""
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < n:
        pid = str(uuid.UUID(bytes=rng.bytes(16), version=4))
        if pid not in seen:
            seen.add(pid)
            ids.append(pid)
    return ids


def _format_box(box: Box) -> str:
    return ",".join(f"{float(v):.1f}" for v in box)


def make_dataset(
    out: Path,
    n: int,
    *,
    seed: int = 0,
    size: int = 1024,
    positive_fraction: float = 0.22,
    quality: int = 90,
    progress: bool | None = None,
) -> SynthSummary:
    """Write an RSNA-like data set of ``n`` synthetic chest X-rays to ``out``.

    Class mix: ``round(n * positive_fraction)`` positives ('Lung Opacity', 1-4 boxes each);
    of the negatives, 55% 'No Lung Opacity / Not Normal' and the rest 'Normal', assigned in
    a seeded random order.

    Args:
        out: Output folder; ``images/`` and the two CSVs are written inside it.
        n: Number of images.
        seed: Seed of the generator; the same seed gives byte-identical output.
        size: Rows and columns of each image (RSNA: 1024).
        positive_fraction: Fraction of positives (RSNA: about 0.22).
        quality: JPEG quality.
        progress: Show a tqdm bar; ``None`` shows it when stderr is a terminal or n >= 1000.

    Returns:
        A :class:`SynthSummary` with the counts, paths and per-patient records.

    Raises:
        ValueError: If a parameter is out of its allowed range.
    """
    cfg = SynthConfig(
        n=n, seed=seed, size=size, positive_fraction=positive_fraction, quality=quality
    )
    started = time.perf_counter()
    out = Path(out)
    images_dir = out / "images"
    images_dir.mkdir(parents=True, exist_ok=True)

    rng = np.random.default_rng(cfg.seed)
    patient_ids = _patient_ids(rng, cfg.n)
    n_pos = round(cfg.n * cfg.positive_fraction)
    n_not_normal = round((cfg.n - n_pos) * cfg.not_normal_fraction)
    normal, not_normal, positive = range(len(CLASS_NAMES))  # indices into shards.format.CLASS_NAMES
    classes = np.array(
        [positive] * n_pos + [not_normal] * n_not_normal + [normal] * (cfg.n - n_pos - n_not_normal),
        dtype=np.int64,
    )
    classes = classes[rng.permutation(cfg.n)]
    bases = [_render_base(cfg.size, rng) for _ in range(_N_BASES)]
    noise = _noise_tile(rng, cfg.size)

    if progress is None:
        progress = sys.stderr.isatty() or cfg.n >= 1000
    records: list[SynthRecord] = []
    for pid, class_id in tqdm(
        zip(patient_ids, classes.tolist()), total=cfg.n, desc="synth", unit="img",
        disable=not progress,
    ):
        target = int(class_id == positive)
        # AP films are more common among the sick (as in RSNA); ages like RSNA's 1-92.
        view = "AP" if rng.random() < (0.7 if target else 0.38) else "PA"
        sex = "M" if rng.random() < 0.57 else "F"
        age = str(int(np.clip(round(rng.normal(47.0, 16.5)), 1, 92)))
        n_boxes = int(rng.choice(4, p=_BOX_COUNT_P)) + 1 if target else 0
        case = _draw_case(rng, bases, n_boxes=n_boxes, size=cfg.size)
        pixels = _render(case, bases, noise, cfg.size)
        path = write_dicom(
            images_dir / f"{pid}.dcm", pixels, patient_id=pid, view_position=view, sex=sex,
            age=age, quality=cfg.quality, uid_seed=str(cfg.seed),
        )
        records.append(
            SynthRecord(
                patient_id=pid, path=path, target=target, class_name=CLASS_NAMES[class_id],
                boxes=tuple(op.box for op in case.opacities), view_position=view, sex=sex,
                age=age, lungs=case.lungs,
            )
        )

    labels_csv, class_csv = _write_csvs(out, records)
    class_counts = {name: sum(r.class_name == name for r in records) for name in CLASS_NAMES}
    summary = SynthSummary(
        out=out, images_dir=images_dir, labels_csv=labels_csv, class_info_csv=class_csv,
        size=cfg.size, n_images=len(records), n_positive=sum(r.target for r in records),
        n_boxes=sum(len(r.boxes) for r in records), class_counts=class_counts,
        records=tuple(records),
    )
    log.info(
        "synth: wrote %d images %dx%d to %s (%d positive with %d boxes, %d not normal, "
        "%d normal) in %.1f s",
        summary.n_images, cfg.size, cfg.size, out, summary.n_positive, summary.n_boxes,
        class_counts[CLASS_NAMES[not_normal]], class_counts[CLASS_NAMES[normal]],
        time.perf_counter() - started,
    )
    return summary


def _write_csvs(out: Path, records: Sequence[SynthRecord]) -> tuple[Path, Path]:
    """Write RSNA's two label CSVs: one row per box, one empty-box row per negative."""
    labels = ["patientId,x,y,width,height,Target"]
    classes = ["patientId,class"]
    for rec in records:
        rows = [f"{_format_box(b)},1" for b in rec.boxes] if rec.target else [",,,,0"]
        for row in rows:
            labels.append(f"{rec.patient_id},{row}")
            classes.append(f"{rec.patient_id},{rec.class_name}")
    labels_csv = out / LABELS_CSV
    class_csv = out / CLASS_INFO_CSV
    atomic_write_bytes(labels_csv, ("\n".join(labels) + "\n").encode(), durable=False)
    atomic_write_bytes(class_csv, ("\n".join(classes) + "\n").encode(), durable=False)
    return labels_csv, class_csv


@dataclass(frozen=True)
class SynthIngested:
    """What :func:`make_ingested` wrote."""

    synth: SynthSummary
    """The synthetic DICOMs and label CSVs (``WORK/rsna``)."""
    out: Path
    """The ingested dataset folder (``WORK/ds``)."""


def make_ingested(
    work: Path,
    n: int,
    *,
    seed: int = 0,
    src_size: int = 1024,
    positive_fraction: float = 0.22,
    **ingest_options: Any,
) -> SynthIngested:
    """Write ``n`` synthetic DICOMs to ``work/rsna`` (see :func:`make_dataset`) and ingest them,
    labels and class info included, into a fresh ``work/ds``: the data of the benches and tests.

    Args:
        work: Folder to write both into.
        n, seed, positive_fraction: As for :func:`make_dataset`.
        src_size: Rows and columns of the synthetic images (``size`` of :func:`make_dataset`).
        **ingest_options: :class:`IngestConfig` fields, ``size`` (the ingested images') included.

    Raises:
        ValueError: If a parameter is out of its allowed range.
    """
    from ingest.pipeline import run_ingest  # the driver (Dask) only where a set is ingested

    synth = make_dataset(Path(work) / "rsna", n, seed=seed, size=src_size, positive_fraction=positive_fraction,
                         progress=False)
    out = Path(work) / "ds"
    shutil.rmtree(out, ignore_errors=True)
    run_ingest(synth.ingest_config(out, **ingest_options))
    return SynthIngested(synth=synth, out=out)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ingest.synth",
        description="Write a synthetic RSNA-like data set (JPEG Baseline CR DICOMs + label CSVs).",
    )
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--n", type=int, required=True, help="number of images")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--size", type=int, default=1024, help="rows = columns (default 1024)")
    parser.add_argument(
        "--positive-fraction", type=float, default=0.22, help="fraction of positives (0.22)"
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality (default 90)")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(level=logging.WARNING if args.quiet else logging.INFO, dask=False)
    try:
        summary = make_dataset(
            args.out, args.n, seed=args.seed, size=args.size,
            positive_fraction=args.positive_fraction, quality=args.quality,
        )
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    print(summary.out)  # CLI output: the data set's folder, for scripts to pick up
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
