"""``python -m ingest.compare``: the same images through ``--resample dct`` and ``area``.

Renders every DICOM of a folder (default: the demo set, made here if missing) both ways and
prints the differences per image (mean and 99th percentile of the absolute grey-level
difference, SSIM), summarised over the set as a Markdown table; ``--png`` writes one image
side by side: area | dct | difference x8, with a zoomed crop of each below.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
from pathlib import Path

import cv2
import numpy as np

from ingest.render import render
from ingest.synth import make_dataset
from shards.cli import configure_logging
from shards.manifest import ProcessingParams

log = logging.getLogger(__name__)

_SSIM_C1, _SSIM_C2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    """Mean structural similarity of two uint8 images (Wang et al. 2004: 11x11 Gaussian,
    sigma 1.5, K1 = 0.01, K2 = 0.03)."""
    x, y = a.astype(np.float64), b.astype(np.float64)

    def blur(z: np.ndarray) -> np.ndarray:
        return cv2.GaussianBlur(z, (11, 11), 1.5)

    mx, my = blur(x), blur(y)
    vx, vy, cxy = blur(x * x) - mx * mx, blur(y * y) - my * my, blur(x * y) - mx * my
    num = (2 * mx * my + _SSIM_C1) * (2 * cxy + _SSIM_C2)
    den = (mx * mx + my * my + _SSIM_C1) * (vx + vy + _SSIM_C2)
    return float((num / den).mean())


def differences(area: np.ndarray, dct: np.ndarray) -> dict[str, float]:
    """Mean and 99th percentile of ``|dct - area|``, and their SSIM."""
    diff = np.abs(dct.astype(np.int16) - area.astype(np.int16))
    return {"mean": float(diff.mean()), "p99": float(np.percentile(diff, 99)), "ssim": ssim(area, dct)}


def picture(area: np.ndarray, dct: np.ndarray, crop: int = 160) -> np.ndarray:
    """area | dct | |difference| x 8 on top; a central ``crop`` x ``crop/2`` px strip of
    each, enlarged 4x, below."""
    diff = np.clip(np.abs(dct.astype(np.int16) - area.astype(np.int16)) * 8, 0, 255).astype(np.uint8)
    h, w = area.shape
    crop = min(crop, w // 2)  # at most half the image, so the strip is a real enlargement
    y0, x0 = (h - crop // 2) // 2, (w - crop) // 2

    def zoom(img: np.ndarray) -> np.ndarray:
        strip = img[y0 : y0 + crop // 2, x0 : x0 + crop]
        return cv2.resize(strip, (w, w // 2), interpolation=cv2.INTER_NEAREST)

    grid = np.vstack([np.hstack([area, dct, diff]), np.hstack([zoom(area), zoom(dct), zoom(diff)])])
    out = grid.copy()
    for i, label in enumerate(("--resample area", "--resample dct", "|dct - area| x 8")):
        cv2.putText(out, label, (i * w + 12, 36), cv2.FONT_HERSHEY_SIMPLEX, 1.0, 255, 2, cv2.LINE_AA)
        cv2.putText(out, "centre, 4x", (i * w + 12, h + 36), cv2.FONT_HERSHEY_SIMPLEX, 0.8, 255, 2, cv2.LINE_AA)
    cv2.rectangle(out, (x0, y0), (x0 + crop, y0 + crop // 2), 255, 1)
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ingest.compare", description=__doc__.splitlines()[0])
    p.add_argument("--dicom-dir", type=Path, help="DICOMs to compare (default: the demo set, synthesised)")
    p.add_argument("--n", type=int, default=200, help="images of the synthesised demo set (make demo's DEMO_N)")
    p.add_argument("--size", type=int, default=640, help="output side in pixels")
    p.add_argument("--png", type=Path, help="write the side-by-side picture of the first image here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(level=logging.WARNING, dask=False)
    cv2.setNumThreads(1)
    if args.dicom_dir is None:
        tmp = Path(tempfile.mkdtemp(prefix="ingest-compare-"))
        args.dicom_dir = make_dataset(tmp / "rsna", args.n, seed=0, progress=False).images_dir
    files = sorted(f for f in args.dicom_dir.rglob("*") if f.is_file())
    processing = ProcessingParams(size=args.size, clahe_clip=2.0, clahe_grid=8)
    rows = []
    for i, f in enumerate(files):
        data = f.read_bytes()
        area = render(data, dataclasses.replace(processing, resample="area")).image
        dct = render(data, dataclasses.replace(processing, resample="dct")).image
        rows.append(differences(area, dct))
        if i == 0 and args.png:
            args.png.parent.mkdir(parents=True, exist_ok=True)
            cv2.imwrite(str(args.png), picture(area, dct))
    table = {k: np.array([r[k] for r in rows]) for k in ("mean", "p99", "ssim")}
    print(f"{len(rows)} images from {args.dicom_dir}, {args.size} px, --resample dct against area\n")
    print("| per image | median | min | max |")
    print("|---|---:|---:|---:|")
    for key, name in (("mean", "mean abs. difference (grey levels)"), ("p99", "99th percentile abs. difference"), ("ssim", "SSIM")):
        v = table[key]
        fmt = "{:.4f}" if key == "ssim" else "{:.2f}"
        print(f"| {name} | {fmt.format(np.median(v))} | {fmt.format(v.min())} | {fmt.format(v.max())} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
