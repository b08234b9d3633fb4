"""``python -m shards.bench``: how fast shards are checked, on a freshly ingested synthetic set.

The data: ``--n`` synthetic RSNA-like 1024x1024 DICOMs ingested at 640x640 into shards of
``--shard-size`` samples. Then each selected section runs and prints a markdown table.

Section ``verify`` (side by side in one run, over the same shard files, page cache warm):

(a) ``sha256sum`` over the shard files: the floor a user compares with (one process);
(a2) Python's hashlib alone over the same files: what is left for parsing on top of hashing;
(b) quick verify in this process: hash + tar parse + JSON per sample, in one pass over each
    shard's bytes; MB/s and the ratio to (a) (target >= 0.8x);
(c) deep verify in this process: every image decoded, every JSON checked against labels.zarr;
    samples/s (target >= 1000 per process);
(d) quick verify on all cores (Dask LocalCluster, one task per shard): first task to last.

Section ``lifecycle`` (:mod:`shards.lifecycle_bench`): withdrawing ``--withdraw`` patients,
one per shard: shards rewritten and seconds.

The training loader's own benchmark is ``python -m train.bench --loader-only`` (it belongs to
the ``train`` layer).

Sections are functions ``(BenchData, args) -> Section`` listed in :data:`SECTIONS`; add one
there to extend the bench.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from shards.bench_common import BenchData, Section
from shards.cli import configure_logging
from shards.lifecycle_bench import lifecycle_section
from shards.manifest import READ_CHUNK, SHARDS_DIR, read_manifest
from shards.remote_bench import remote_section
from shards.report import VerifyReport
from shards.verify import VerifyConfig, verify

log = logging.getLogger(__name__)


def build_data(work: Path, n: int, shard_size: int, size: int = 640) -> BenchData:
    """Make ``n`` synthetic 1024 px DICOMs and ingest them at ``size`` px (all cores)."""
    from ingest.synth import make_ingested

    out = make_ingested(work, n, seed=0, src_size=1024, size=size, shard_size=shard_size).out
    m = read_manifest(out)
    files = [out / SHARDS_DIR / s.name for s in m.shards]
    return BenchData(out=out, shard_files=files, samples=m.counts["samples"], bytes=sum(s.bytes for s in m.shards),
                     cores=os.cpu_count() or 1)


def warm(files: list[Path]) -> None:
    """Read every file once so each contender reads from the page cache."""
    for f in files:
        with open(f, "rb") as fh:
            while fh.read(1 << 24):
                pass


def time_sha256sum(files: list[Path], repeat: int) -> float:
    """Best wall seconds of ``sha256sum FILES...``."""
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(["sha256sum", *map(str, files)], check=True, stdout=subprocess.DEVNULL)
        best = min(best, time.perf_counter() - t)
    return best


def time_hashlib(files: list[Path], repeat: int) -> float:
    """Best wall seconds of Python's hashlib.sha256 over the files in 4 MB reads: the hash alone."""
    best = float("inf")
    buf = memoryview(bytearray(READ_CHUNK))
    for _ in range(repeat):
        t = time.perf_counter()
        for f in files:
            h = hashlib.sha256()
            with open(f, "rb", buffering=0) as fh:
                while n := fh.readinto(buf):
                    h.update(buf[:n])
        best = min(best, time.perf_counter() - t)
    return best


def time_verify(out: Path, *, deep: bool, workers: int, repeat: int) -> VerifyReport:
    """The fastest of ``repeat`` verify runs (by its wall time); it must find no problem."""
    best: VerifyReport | None = None
    for _ in range(repeat):
        report = verify(VerifyConfig(out=out, deep=deep, workers=workers, progress=False))
        if not report.ok:
            raise RuntimeError("verify found problems in the bench dataset:\n" + "\n".join(report.lines()))
        if best is None or report.seconds < best.seconds:
            best = report
    assert best is not None
    return best


def verify_section(data: BenchData, args: argparse.Namespace) -> Section:
    """Quick verify against sha256sum, deep verify per process, quick verify on all cores."""
    warm(data.shard_files)
    mb = data.bytes / 1e6
    t_sum = time_sha256sum(data.shard_files, args.repeat)
    t_hash = time_hashlib(data.shard_files, args.repeat)
    quick = time_verify(data.out, deep=False, workers=1, repeat=args.repeat)
    deep = time_verify(data.out, deep=True, workers=1, repeat=args.repeat)
    sec = Section(
        f"verify: {len(data.shard_files)} shards, {data.samples} samples, {mb:.0f} MB (640x640), {data.cores} cores",
        ["contender", "MB/s", "samples/s", "where", "target"],
    )
    ratio = (mb / quick.seconds) / (mb / t_sum)
    sec.rows += [
        ["(a) sha256sum over the shard files", f"{mb / t_sum:.0f}", f"{data.samples / t_sum:.0f}", "1 process", ""],
        ["(a2) Python hashlib.sha256 alone (4 MB reads)", f"{mb / t_hash:.0f}", f"{data.samples / t_hash:.0f}",
         "1 process", ""],
        ["(b) quick verify (hash + tar + JSON, one pass)", f"{mb / quick.seconds:.0f}",
         f"{quick.samples / quick.seconds:.0f}", "1 process", ""],
        ["(b) / (a)", f"{ratio:.2f}x", "", "", ">= 0.8x"],
        ["(c) deep verify (decode + checks + labels.zarr)", f"{mb / deep.seconds:.0f}",
         f"{deep.samples / deep.seconds:.0f}", "1 process", ">= 1000 samples/s"],
    ]
    if data.cores > 1 and len(data.shard_files) > 1 and not args.no_cluster:
        t0 = time.perf_counter()
        alln = verify(VerifyConfig(out=data.out, workers=data.cores, progress=False))
        wall = time.perf_counter() - t0
        sec.rows.append([f"(d) quick verify, Dask, {alln.workers} workers (first task to last)",
                         f"{mb / alln.scan_seconds:.0f}", f"{alln.samples / alln.scan_seconds:.0f}",
                         f"{alln.workers} workers", ""])
        sec.notes.append(f"(d) wall time with cluster start-up: {wall:.1f} s")
    sec.notes.append(f"quick {ratio:.2f}x sha256sum: {'PASS' if ratio >= 0.8 else 'FAIL'} (target >= 0.8x); "
                     f"deep {deep.samples / deep.seconds:.0f} samples/s per process: "
                     f"{'PASS' if deep.samples / deep.seconds >= 1000 else 'FAIL'} (target >= 1000)")
    return sec


SECTIONS: dict[str, Callable[[BenchData, argparse.Namespace], Section]] = {
    "verify": verify_section,
    "remote": remote_section,
    "lifecycle": lifecycle_section,
}
"""Bench sections by name, run in this order."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m shards.bench", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=256, help="synthetic 1024x1024 images to ingest at 640 px")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard")
    p.add_argument("--repeat", type=int, default=3, help="runs of each contender; the best is reported")
    p.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=["verify"], help="what to measure")
    p.add_argument("--no-cluster", action="store_true", help="skip the all-cores Dask run")
    p.add_argument("--withdraw", type=int, default=10, metavar="N", help="patients the lifecycle section withdraws")
    p.add_argument("--workdir", type=Path, help="keep the data here (default: a temporary folder, removed)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(level=logging.WARNING)
    work = args.workdir or Path(tempfile.mkdtemp(prefix="shards-bench-"))
    try:
        t = time.perf_counter()
        data = build_data(work, args.n, args.shard_size)
        print(f"shards bench: {args.n} synthetic 1024x1024 DICOMs ingested at 640x640 in "
              f"{time.perf_counter() - t:.1f} s; shard size {args.shard_size}\n")
        for name in args.sections:
            print(SECTIONS[name](data, args).markdown())
            print()
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
