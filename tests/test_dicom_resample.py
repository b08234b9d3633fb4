"""``--resample area`` gives the original bytes; ``dct`` decodes JPEG frames at n/8 scale."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom.encaps import generate_frames

from ingest import transforms
from ingest.config import IngestConfig
from ingest.dicom import decode_dicom
from ingest.render import render
from shards.geometry import letterbox_geometry
from shards.manifest import ProcessingParams, params_hash
from tests import dicom_factory as df

PARAMS = ProcessingParams(size=64, clahe_clip=2.0, clahe_grid=8)


def _original_pipeline(path: Path, size: int) -> np.ndarray:
    """What the ingest made before --resample existed: OpenCV full decode, CLAHE, area letterbox."""
    ds = pydicom.dcmread(path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    pixels = cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_UNCHANGED)
    geom = letterbox_geometry(*pixels.shape, size)
    return transforms.letterbox(transforms.clahe(pixels, 2.0, 8), geom)


@pytest.mark.parametrize("rows, cols", [(256, 256), (200, 320), (48, 40)])
def test_area_reproduces_the_original_bytes(tmp_path: Path, rows: int, cols: int) -> None:
    path = df.make_rsna_like(tmp_path / "c.dcm", "c", rows=rows, cols=cols)
    got = render(path.read_bytes(), replace(PARAMS, resample="area"))
    np.testing.assert_array_equal(got.image, _original_pipeline(path, 64))
    assert not got.decoded.resampled


@pytest.mark.parametrize(
    "rows, cols, size, decoded_shape",
    [
        (1024, 1024, 640, (640, 640)),  # exactly 5/8: nothing left to resize
        (256, 256, 64, (64, 64)),  # 2/8
        (200, 320, 64, (50, 80)),  # 2/8 = (50, 80) covers the letterboxed (40, 64)
    ],
)
def test_dct_decodes_at_the_smallest_scale_covering_the_output(tmp_path: Path, rows, cols, size, decoded_shape) -> None:
    path = df.make_rsna_like(tmp_path / "c.dcm", "c", rows=rows, cols=cols)
    data = path.read_bytes()
    decoded = decode_dicom(data, fit=size)
    assert decoded.resampled and decoded.pixels.shape == decoded_shape
    assert (decoded.rows, decoded.cols) == (rows, cols)
    dct = render(data, replace(PARAMS, size=size, resample="dct"))
    area = render(data, replace(PARAMS, size=size, resample="area"))
    assert dct.image.shape == (size, size) and dct.geom == area.geom
    # the same picture (CLAHE at a tiny output size shifts grey levels, not structure)
    assert np.corrcoef(dct.image.ravel(), area.image.ravel())[0, 1] > 0.9
    pad = dct.geom.pad_y
    if pad:
        assert dct.image[:pad].max() == 0 and dct.image[-pad:].max() == 0


@pytest.mark.parametrize("write", [df.write_jpeg2000_lossless, df.write_16bit_voi_lut], ids=["jpeg2000", "voi_lut"])
def test_dct_leaves_other_files_as_area_does(tmp_path: Path, write) -> None:
    data = write(tmp_path).read_bytes()
    dct = render(data, replace(PARAMS, size=32, resample="dct"))
    area = render(data, replace(PARAMS, size=32, resample="area"))
    np.testing.assert_array_equal(dct.image, area.image)


def test_dct_when_enlarging_is_area(tmp_path: Path) -> None:
    data = df.make_rsna_like(tmp_path / "c.dcm", "c", rows=48, cols=40).read_bytes()
    dct = render(data, replace(PARAMS, resample="dct"))
    np.testing.assert_array_equal(dct.image, render(data, replace(PARAMS, resample="area")).image)


def test_resample_is_a_recorded_parameter(tmp_path: Path) -> None:
    a = IngestConfig(dicom_dir=tmp_path, out=tmp_path / "o").dataset_params()
    b = IngestConfig(dicom_dir=tmp_path, out=tmp_path / "o", resample="area").dataset_params()
    assert a["resample"] == "dct" and b["resample"] == "area"
    assert params_hash(a) != params_hash(b)
    with pytest.raises(ValueError, match="resample='bilinear'"):
        IngestConfig(dicom_dir=tmp_path, out=tmp_path / "o", resample="bilinear")


def test_cli_flags_reach_the_config(tmp_path: Path) -> None:
    from ingest.__main__ import build_parser

    args = vars(build_parser().parse_args(["--dicom-dir", "d", "--out", "o", "--resample", "area", "--max-pixels", "1000"]))
    cfg = IngestConfig(**{k: v for k, v in args.items() if k != "verbose"})
    assert (cfg.resample, cfg.max_pixels) == ("area", 1000)
    assert build_parser().parse_args(["--dicom-dir", "d", "--out", "o"]).resample == "dct"


def test_compare_prints_the_difference_table_and_draws_the_picture(tmp_path: Path, capsys) -> None:
    from ingest.compare import main

    for i in range(2):
        df.make_rsna_like(tmp_path / "in" / f"p{i}.dcm", f"p{i}", rows=256, cols=256, seed=i)
    png = tmp_path / "cmp.png"
    assert main(["--dicom-dir", str(tmp_path / "in"), "--size", "64", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "2 images" in out and "| SSIM |" in out and "| mean abs. difference" in out
    picture = cv2.imread(str(png), cv2.IMREAD_GRAYSCALE)
    assert picture.shape == (64 + 32, 3 * 64)
