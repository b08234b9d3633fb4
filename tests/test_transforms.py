"""Letterbox geometry, box mapping, windowing: pure functions against hand-computed values."""

from __future__ import annotations

import numpy as np
import pytest

from ingest import transforms as T
from shards.geometry import boxes_from_letterbox, boxes_to_letterbox, letterbox_geometry


@pytest.mark.parametrize(
    "rows, cols, size, scale, pad_x, pad_y, new_shape",
    [
        (1024, 1024, 640, 0.625, 0, 0, (640, 640)),
        (100, 200, 640, 3.2, 0, 160, (320, 640)),
        (300, 150, 60, 0.2, 15, 0, (60, 30)),
        (48, 64, 64, 1.0, 0, 8, (48, 64)),
    ],
)
def test_letterbox_geometry(rows, cols, size, scale, pad_x, pad_y, new_shape) -> None:
    g = letterbox_geometry(rows, cols, size)
    assert (g.scale, g.pad_x, g.pad_y, g.new_shape) == (pytest.approx(scale), pad_x, pad_y, new_shape)


def test_letterbox_pixels_follow_the_same_geometry_as_boxes() -> None:
    # a non-square image with one bright rectangle: after the letterbox the bright pixels
    # must lie inside the box mapped by boxes_to_letterbox.
    img = np.zeros((200, 400), np.uint8)
    img[50:110, 240:320] = 255
    g = letterbox_geometry(200, 400, 100)
    out = T.letterbox(img, g)
    assert out.shape == (100, 100) and g.pad_y == 25
    x1, y1, x2, y2 = boxes_to_letterbox(np.array([[240, 50, 320, 110]]), g)[0]
    ys, xs = np.nonzero(out > 128)
    assert (x1, y1, x2, y2) == (60, 37.5, 80, 52.5)
    assert xs.min() >= np.floor(x1) and xs.max() < np.ceil(x2)
    assert ys.min() >= np.floor(y1) and ys.max() < np.ceil(y2)
    assert out[:25].max() == 0 and out[75:].max() == 0  # padding stays black


@pytest.mark.parametrize("rows, cols", [(1024, 1024), (480, 640), (640, 333), (2000, 1500)])
def test_boxes_round_trip_to_source_pixels(rows: int, cols: int) -> None:
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, [cols, rows], size=(20, 2))
    wh = rng.uniform(1, 200, size=(20, 2))
    src = T.clip_boxes_xyxy(np.hstack([xy, xy + wh]), rows, cols)
    g = letterbox_geometry(rows, cols, 640)
    back = boxes_from_letterbox(boxes_to_letterbox(src, g), g.to_json())
    np.testing.assert_allclose(back, src, atol=2e-3)  # float32 storage of 640-px coordinates


def test_clip_boxes() -> None:
    got = T.clip_boxes_xyxy(np.array([[-5, -5, 10, 10], [90, 40, 130, 70]]), rows=50, cols=100)
    np.testing.assert_array_equal(got, [[0, 0, 10, 10], [90, 40, 100, 50]])


@pytest.mark.parametrize(
    "values, center, width, expected",
    [
        ([0, 100, 200], 100, 201, [1, 128, 255]),  # PS3.3 C.11.2.1.2.1 with its 0.5 offsets
        ([-1000, 40, 1000], 40, 400, [0, 128, 255]),
        ([-1, 0, 10], 0, 1, [0, 255, 255]),  # width 1: a threshold at center - 0.5
    ],
)
def test_window_to_uint8(values, center, width, expected) -> None:
    np.testing.assert_array_equal(T.window_to_uint8(np.array(values), center, width), expected)


def test_minmax_and_range() -> None:
    np.testing.assert_array_equal(T.minmax_to_uint8(np.array([10, 20, 30])), [0, 128, 255])
    np.testing.assert_array_equal(T.minmax_to_uint8(np.array([7, 7])), [0, 0])
    np.testing.assert_array_equal(T.range_to_uint8(np.array([0, 4095, 5000]), 0, 4095), [0, 255, 255])


def test_clahe_is_deterministic_and_changes_contrast() -> None:
    rng = np.random.default_rng(1)
    img = (rng.normal(100, 5, (64, 64))).clip(0, 255).astype(np.uint8)
    a, b = T.clahe(img, 2.0, 8), T.clahe(img, 2.0, 8)
    np.testing.assert_array_equal(a, b)
    assert a.std() > img.std()
    with pytest.raises(ValueError, match="uint8"):
        T.clahe(img.astype(np.uint16), 2.0, 8)
