"""Pure numpy/OpenCV image and box transforms of the ingest (image in, image out).

:func:`letterbox` resizes pixels by a :class:`shards.geometry.Letterbox`, the geometry every
sample records (it lives in ``shards/`` because verify and training read it too).
"""

from __future__ import annotations

import functools

import cv2
import numpy as np

from shards.geometry import Letterbox


def letterbox(image: np.ndarray, geom: Letterbox) -> np.ndarray:
    """Resize ``image`` by ``geom`` (area filter when shrinking) and pad with zeros."""
    if image.shape[:2] != (geom.rows, geom.cols):
        raise ValueError(f"image {image.shape} does not match letterbox {geom.rows}x{geom.cols}")
    new_h, new_w = geom.new_shape
    interp = cv2.INTER_AREA if geom.scale < 1 else cv2.INTER_LINEAR
    return pad_letterbox(cv2.resize(image, (new_w, new_h), interpolation=interp), geom)


def clip_boxes_xyxy(boxes: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Clip (N, 4) xyxy boxes to a ``rows`` x ``cols`` image."""
    out = np.array(boxes, dtype=np.float64).reshape(-1, 4)
    out[:, [0, 2]] = out[:, [0, 2]].clip(0, cols)
    out[:, [1, 3]] = out[:, [1, 3]].clip(0, rows)
    return out


@functools.lru_cache(maxsize=8)
def _clahe(clip_limit: float, grid: int) -> cv2.CLAHE:
    return cv2.createCLAHE(clipLimit=clip_limit, tileGridSize=(grid, grid))


def clahe(image: np.ndarray, clip_limit: float, grid: int) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (OpenCV) of a uint8 image."""
    if image.dtype != np.uint8:
        raise ValueError(f"CLAHE wants uint8, got {image.dtype}")
    return _clahe(float(clip_limit), int(grid)).apply(image)


def minmax_to_uint8(values: np.ndarray) -> np.ndarray:
    """Linearly stretch ``values`` from their own min..max onto 0..255."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(v.min()), float(v.max())
    if hi <= lo:
        return np.zeros(v.shape, dtype=np.uint8)
    return np.rint((v - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def range_to_uint8(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Map ``lo..hi`` linearly onto 0..255, clipping outside."""
    if hi <= lo:
        raise ValueError(f"empty range {lo}..{hi}")
    v = (np.asarray(values, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    return np.rint(v.clip(0, 255)).astype(np.uint8)


def window_to_uint8(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM LINEAR window (PS3.3 C.11.2.1.2.1) straight onto 0..255."""
    if width < 1:
        raise ValueError(f"window width {width} < 1")
    c, w = center - 0.5, width - 1.0
    v = np.asarray(values, dtype=np.float64)
    out = ((v - c) / max(w, 1e-12) + 0.5) * 255.0
    out = np.where(v <= c - w / 2, 0.0, np.where(v > c + w / 2, 255.0, out))
    return np.rint(out.clip(0, 255)).astype(np.uint8)


def rgb_to_grey(image: np.ndarray) -> np.ndarray:
    """ITU-R BT.601 luma of an (H, W, 3) RGB image, in the input's value range (float64)."""
    rgb = np.asarray(image, dtype=np.float64)
    return rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114


def resize_area(image: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Area-filter ``image`` to (rows, cols) ``shape``; the same array if it already fits."""
    if image.shape[:2] == tuple(shape):
        return image
    return cv2.resize(image, (shape[1], shape[0]), interpolation=cv2.INTER_AREA)


def pad_letterbox(resized: np.ndarray, geom: Letterbox) -> np.ndarray:
    """Place an image already resized to ``geom.new_shape`` in the zero-padded square."""
    new_h, new_w = geom.new_shape
    if resized.shape[:2] != (new_h, new_w):
        raise ValueError(f"image {resized.shape} is not the letterbox's resized shape {geom.new_shape}")
    if (new_h, new_w) == (geom.size, geom.size):
        return resized
    out = np.zeros((geom.size, geom.size), dtype=resized.dtype)
    out[geom.pad_y : geom.pad_y + new_h, geom.pad_x : geom.pad_x + new_w] = resized
    return out
