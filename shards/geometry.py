"""The letterbox geometry every sample's JSON ``transform`` records.

The geometry that maps a source image into the square stored image is the same one that maps
boxes into it (:func:`boxes_to_letterbox`) and maps predictions back to source pixels
(:func:`boxes_from_letterbox`): one :class:`Letterbox` value, stored with every sample as
``transform``. The ingest resizes pixels with it (``ingest.transforms.letterbox``), verify
checks the stored value against :func:`letterbox_geometry`, and training maps predictions back
with it; it lives here, in the format layer, so that none of them imports another.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True)
class Letterbox:
    """Resize-and-pad of a ``rows`` x ``cols`` source into a ``size`` x ``size`` square.

    A source pixel coordinate ``x`` maps to ``x * scale + pad_x`` (``y`` likewise with
    ``pad_y``); the inverse is ``(x' - pad_x) / scale``.
    """

    scale: float
    pad_x: int
    pad_y: int
    rows: int
    cols: int
    size: int

    @property
    def new_shape(self) -> tuple[int, int]:
        """(height, width) of the resized image before padding."""
        return (max(1, round(self.rows * self.scale)), max(1, round(self.cols * self.scale)))

    def to_json(self) -> dict[str, float | int]:
        """The sample JSON's ``transform`` field (``dataclasses.asdict`` without its deep copy:
        every field is a number)."""
        return {name: getattr(self, name) for name in TRANSFORM_FIELDS}


TRANSFORM_FIELDS = tuple(f.name for f in dataclasses.fields(Letterbox))
"""The fields of a sample JSON's ``transform`` object."""


def letterbox_geometry(rows: int, cols: int, size: int) -> Letterbox:
    """The letterbox that fits ``rows`` x ``cols`` into ``size`` keeping the aspect ratio."""
    if rows <= 0 or cols <= 0 or size <= 0:
        raise ValueError(f"bad geometry rows={rows} cols={cols} size={size}")
    scale = size / max(rows, cols)
    new_h, new_w = max(1, round(rows * scale)), max(1, round(cols * scale))
    return Letterbox(scale, (size - new_w) // 2, (size - new_h) // 2, rows, cols, size)


def boxes_to_letterbox(boxes_xyxy: np.ndarray, geom: Letterbox) -> np.ndarray:
    """Map (N, 4) source-pixel xyxy boxes into letterboxed pixels (float32)."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    out = b * geom.scale + np.array([geom.pad_x, geom.pad_y, geom.pad_x, geom.pad_y])
    return out.clip(0, geom.size).astype(np.float32)


def boxes_from_letterbox(boxes_xyxy: np.ndarray, geom: Letterbox | dict) -> np.ndarray:
    """Map (N, 4) letterboxed xyxy boxes back to source pixels (float64).

    ``geom`` may be the sample JSON's ``transform`` dict as stored.
    """
    if isinstance(geom, dict):
        geom = Letterbox(**geom)
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    pad = np.array([geom.pad_x, geom.pad_y, geom.pad_x, geom.pad_y], dtype=np.float64)
    return (b - pad) / geom.scale
