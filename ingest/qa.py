"""Image QA flags of one decoded file: pure functions, every parameter explicit.

Each rule reads the header fields the decoder kept or the 8-bit image as decoded (windowed,
MONOCHROME1 inverted, before CLAHE and letterboxing; at the reduced scale of a ``dct``
decode). Its one-line statement is :data:`shards.qa.QA_RULES`; the figures are here:

| flag                   | rule                                                                   |
|------------------------|------------------------------------------------------------------------|
| ``blank``              | the pixels between the 0.5th and 99.5th percentile span fewer than     |
|                        | :data:`BLANK_MAX_SPAN` grey levels                                     |
| ``lateral``            | ViewPosition (stripped, upper case) in :data:`LATERAL_VIEWS`           |
| ``not_chest``          | BodyPartExamined present, non-empty and not ``CHEST``                  |
| ``burned_in_annotation`` | BurnedInAnnotation is ``YES``                                        |
| ``low_dynamic_range``  | the :data:`LOW_RANGE_LEVELS` most frequent grey levels of 1..254 hold  |
|                        | more than :data:`LOW_RANGE_FRACTION` of the pixels that are not 0/255  |
| ``small_source``       | Rows or Columns under :data:`SMALL_SIDE`                               |
| ``inverted_suspect``   | see :func:`looks_inverted`                                             |

The pixel rules read a sampling grid of the image (:func:`grid`: every ``k``-th pixel of every
``k``-th row, at least :data:`GRID` per side): a percentile, a share of pixels or a column
band's mean over 6,400 samples or more moves by about a grey level, and the flags cost a small
share of a sample's time (``python -m ingest.bench``, line (g)), not a tenth. Past the two
OpenCV calls (the histogram, the column profile) the rules work on Python lists of 256 and of
about 100 numbers: each numpy call costs microseconds in a worker whose caches the decoder and
CLAHE have just filled, several times what it costs in a loop of its own.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import cv2
import numpy as np

from ingest.dicom import DecodedDicom
from shards.qa import QA_FLAGS

GRID = 80
"""Samples per side of the grid the pixel rules read (at least: the step is rounded down)."""
BLANK_MAX_SPAN = 8
"""``blank`` below this many grey levels between the 0.5th and the 99.5th percentile."""
BLANK_TAIL = 0.005
"""Share of pixels left out at each end for ``blank`` (text, a marker, dead pixels)."""
LOW_RANGE_LEVELS = 8
"""``low_dynamic_range``: how many of the most frequent grey levels are counted ..."""
LOW_RANGE_FRACTION = 0.5
"""... and the share of the pixels above which they flag the image."""
SMALL_SIDE = 512
"""``small_source`` below this many rows or columns (a thumbnail, a cropped export)."""
LATERAL_VIEWS = frozenset(("LL", "RL", "LATERAL"))
"""ViewPosition values of a lateral projection."""
INVERTED_MARGIN = 8.0
"""``inverted_suspect`` when the lungs are brighter than the spine by more than this (grey levels)."""
ROW_BAND = (0.3, 0.7)
"""Rows (fractions of the height) where :func:`looks_inverted` compares columns: the lungs'
middle, below the shoulders and above the diaphragm."""
SPINE = (0.45, 0.55)
"""Columns of the spine and mediastinum in a frontal view."""
LUNGS = ((0.2, 0.35), (0.65, 0.8))
"""Columns of the two lung fields in a frontal view."""


def grid(pixels: np.ndarray, side: int = GRID) -> np.ndarray:
    """Every ``k``-th pixel of every ``k``-th row, ``k`` the largest step that keeps at least
    ``side`` samples on the shorter side (the image itself when it is that small)."""
    step = max(1, min(pixels.shape) // side)
    return pixels if step == 1 else np.ascontiguousarray(pixels[::step, ::step])


def histogram(pixels: np.ndarray) -> list[float]:
    """Counts of the 256 grey levels of a uint8 image."""
    return cv2.calcHist([np.ascontiguousarray(pixels)], [0], None, [256], [0, 256]).ravel().tolist()


def is_blank(hist: Sequence[float], max_span: int = BLANK_MAX_SPAN, tail: float = BLANK_TAIL) -> bool:
    """Near-constant: the grey levels between the ``tail`` and ``1 - tail`` quantiles span
    fewer than ``max_span`` levels (``hist``: the 256 counts of :func:`histogram`)."""
    cum = list(itertools.accumulate(hist))
    total = cum[-1]
    if total <= 0:
        return True
    return bisect.bisect_left(cum, (1 - tail) * total) - bisect.bisect_right(cum, tail * total) < max_span


def is_low_dynamic_range(hist: Sequence[float], levels: int = LOW_RANGE_LEVELS,
                         fraction: float = LOW_RANGE_FRACTION) -> bool:
    """Most pixels in a few grey levels: the ``levels`` most frequent hold more than ``fraction``.

    Saturated pixels (0 and 255) are left out: direct exposure and a collimator's shadow are
    large flat areas of a sound radiograph. An image with nothing but saturated pixels is flagged.
    """
    inner = sorted(hist[1:255])
    total = sum(inner)
    return total <= 0 or sum(inner[-levels:]) > fraction * total


def is_lateral(view_position: str | None, views: frozenset[str] = LATERAL_VIEWS) -> bool:
    """ViewPosition names a lateral projection."""
    return bool(view_position) and view_position.strip().upper() in views


def is_not_chest(body_part: str | None) -> bool:
    """BodyPartExamined is present and says something other than CHEST."""
    return bool(body_part and body_part.strip()) and body_part.strip().upper() != "CHEST"


def is_burned_in(burned_in_annotation: str | None) -> bool:
    """BurnedInAnnotation is YES."""
    return bool(burned_in_annotation) and burned_in_annotation.strip().upper() == "YES"


def is_small(rows: int, cols: int, min_side: int = SMALL_SIDE) -> bool:
    """Either side of the source image is under ``min_side`` pixels."""
    return min(rows, cols) < min_side


def looks_inverted(
    pixels: np.ndarray,
    margin: float = INVERTED_MARGIN,
    row_band: tuple[float, float] = ROW_BAND,
    spine: tuple[float, float] = SPINE,
    lungs: tuple[tuple[float, float], ...] = LUNGS,
) -> bool:
    """The image as decoded looks like a MONOCHROME1 image shown as MONOCHROME2.

    The heuristic follows the anatomy of a frontal chest radiograph: across the middle rows the
    spine and mediastinum (the central columns) attenuate most and are bright, the air-filled
    lungs on either side are dark. An image whose lung columns are brighter than its spine
    column by more than ``margin`` grey levels is upside down in intensity: on a MONOCHROME2
    file, a mislabelled export. It reads only the image, so it judges a correctly labelled
    MONOCHROME1 file (inverted by the decoder) as it judges a MONOCHROME2 one. A limb, centred,
    is bright against air too and passes; a view without a central bright column can be flagged.
    """
    h, w = pixels.shape
    r0 = int(row_band[0] * h)
    band = np.ascontiguousarray(pixels[r0 : max(int(row_band[1] * h), r0 + 1)])
    profile = cv2.reduce(band, 0, cv2.REDUCE_AVG, dtype=cv2.CV_32F).ravel().tolist()  # mean of each column

    def mean(cols: tuple[float, float]) -> float:
        c0 = int(cols[0] * w)
        c1 = max(int(cols[1] * w), c0 + 1)
        return sum(profile[c0:c1]) / (c1 - c0)

    return sum(mean(band) for band in lungs) / len(lungs) - mean(spine) > margin


def qa_flags(decoded: DecodedDicom) -> list[str]:
    """The QA flags of one decoded file, in :data:`shards.qa.QA_FLAGS` order."""
    sampled = grid(decoded.pixels)
    hist = histogram(sampled)
    found = {
        "blank": is_blank(hist),
        "lateral": is_lateral(decoded.view_position),
        "not_chest": is_not_chest(decoded.body_part),
        "burned_in_annotation": is_burned_in(decoded.burned_in_annotation),
        "low_dynamic_range": is_low_dynamic_range(hist),
        "small_source": is_small(decoded.rows, decoded.cols),
        "inverted_suspect": looks_inverted(sampled),
    }
    return [flag for flag in QA_FLAGS if found[flag]]
