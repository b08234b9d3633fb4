"""``python -m ingest.bench``: ingest throughput against the naive loop and the floor.

Measured side by side in one run on synthetic RSNA-like files (1024x1024 JPEG Baseline):

(a) naive: what a user writes first: ``pydicom.dcmread(f).pixel_array`` -> CLAHE -> resize ->
    one PNG per image;
(b) floor: the unavoidable work, in memory: read + parse + decode (OpenCV on the encapsulated
    JPEG frame) + CLAHE + resize, nothing written;
(c) ours: ``run_ingest`` on a LocalCluster with 1 worker and with all cores (hashing, JSON,
    npy, tar, Dask scheduling included; cluster start-up reported apart).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pydicom.encaps

from ingest import transforms
from ingest.config import IngestConfig
from ingest.pipeline import run_ingest
from ingest.synth import make_dataset
from shards.cli import configure_logging


def naive(files: list[Path], out: Path, size: int) -> float:
    """(a) pixel_array -> CLAHE -> resize -> PNG; returns seconds."""
    out.mkdir(parents=True, exist_ok=True)
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    t = time.perf_counter()
    for f in files:
        img = pydicom.dcmread(f).pixel_array.astype(np.uint8)
        img = cv2.resize(clahe.apply(img), (size, size), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(out / f"{f.stem}.png"), img)
    return time.perf_counter() - t


def floor(files: list[Path], size: int) -> float:
    """(b) read + parse + OpenCV decode + CLAHE + resize, in memory; returns seconds."""
    t = time.perf_counter()
    for f in files:
        ds = pydicom.dcmread(io.BytesIO(f.read_bytes()))
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        img = cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_UNCHANGED)
        img = transforms.clahe(img, 2.0, 8)
        cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return time.perf_counter() - t


def ours(images: Path, labels: Path, out: Path, workers: int, shard_size: int) -> dict[str, float]:
    """(c) the real ingest; returns wall seconds, busy seconds and peak worker RSS."""
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    summary = run_ingest(
        IngestConfig(dicom_dir=images, out=out, labels=labels, workers=workers, shard_size=shard_size, progress=False)
    )
    wall = time.perf_counter() - t
    recs = summary.records
    span = max(r["finished"] for r in recs) - min(r["started"] for r in recs)
    return {
        "wall": wall,
        "span": span,
        "busy": sum(r["seconds"] for r in recs),
        "rss": max(r["max_rss_mb"] for r in recs),
        "samples": summary.counts["samples"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ingest.bench", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="synthetic images (1024x1024)")
    p.add_argument("--shard-size", type=int, default=32)
    p.add_argument("--repeat", type=int, default=2, help="runs of each loop; the best is reported")
    p.add_argument("--workdir", type=Path, help="keep data here (default: a temp folder)")
    args = p.parse_args(argv)
    configure_logging(level=logging.WARNING)
    cv2.setNumThreads(1)  # like each ingest worker: the comparison is per process
    cores = os.cpu_count() or 1
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    synth = make_dataset(work / "synth", args.n, seed=0, size=1024, progress=False)
    files = sorted(synth.images_dir.glob("*.dcm"))
    for f in files:  # warm the page cache so every contender reads from memory
        f.read_bytes()

    t_naive = min(naive(files, work / "png", 640) for _ in range(args.repeat))
    t_floor = min(floor(files, 640) for _ in range(args.repeat))
    one = min((ours(synth.images_dir, synth.labels_csv, work / "o1", 1, args.shard_size) for _ in range(args.repeat)), key=lambda r: r["span"])
    alln = min((ours(synth.images_dir, synth.labels_csv, work / "on", cores, args.shard_size) for _ in range(args.repeat)), key=lambda r: r["span"])
    n = len(files)
    rows = [
        ("(a) naive: pixel_array -> CLAHE -> resize -> PNG", n / t_naive, "1 process"),
        ("(b) floor: OpenCV decode + CLAHE + resize, in memory", n / t_floor, "1 process"),
        ("(c) ours, 1 worker (per process, busy time)", one["samples"] / one["busy"], "1 worker"),
        ("(c) ours, 1 worker (wall, first task to last)", one["samples"] / one["span"], "1 worker"),
        (f"(c) ours, {cores} workers (wall, first task to last)", alln["samples"] / alln["span"], f"{cores} workers"),
    ]
    print(f"ingest bench: {n} synthetic 1024x1024 JPEG Baseline DICOMs -> {640}x{640}, shard size {args.shard_size}, {cores} cores\n")
    print(f"| {'contender':54} | images/s | where     |")
    print(f"|{'-' * 56}|----------|-----------|")
    for name, rate, where in rows:
        print(f"| {name:54} | {rate:8.1f} | {where:9} |")
    per_proc = one["samples"] / one["busy"]
    print()
    print(f"floor / naive                       = {t_naive / t_floor:5.2f}x")
    print(f"ours per process / floor            = {per_proc / (n / t_floor):5.2f}   (target >= 0.75)")
    print(f"ours all cores / (cores x 1 worker) = {(alln['samples'] / alln['span']) / (cores * one['samples'] / one['span']):5.2f}   (target >= 0.90)")
    print(f"peak RSS per worker process         = {max(one['rss'], alln['rss']):5.0f} MB (target < 500 MB)")
    print(f"cluster start-up + planning + finish = {alln['wall'] - alln['span']:.1f} s (all cores run, not in the rates)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
