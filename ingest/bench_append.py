"""``python -m ingest.bench --append``: appending new files to a dataset against ingesting them alone.

One synthetic set is written and dealt into two folders: ``--existing`` files, ingested once
into the base dataset, and ``--n`` new ones. Every round ingests the new files alone into an
empty folder and appends them to a fresh copy of the base (the copy is not timed), in
alternating order, each after a sync (the copy's writeback would otherwise slow the append's
own writes, the more the larger the base); the append's wall time (the call, cluster start-up
included, as for the ingest alone) is divided by the ingest's in the same round, and the median
(and range) over the rounds is reported against the bound of 1.1: an append reads of the old
dataset only its manifest, label store, source index and version records, never a shard.
"""

from __future__ import annotations

import os
import shutil
import statistics
import time
from pathlib import Path

from ingest.append import run_append
from ingest.pipeline import run_ingest
from ingest.synth import make_dataset

BOUND = 1.1
"""The most an append may cost against ingesting its files alone."""


def run_append_bench(work: Path, existing: int, n: int, shard_size: int, repeat: int, workers: int,
                     image_size: int = 512, size: int = 256) -> list[str]:
    """The table's lines."""
    synth = make_dataset(work / "synth", existing + n, seed=0, size=image_size, progress=False)
    files = sorted(synth.images_dir.glob("*.dcm"))
    old, new = work / "old", work / "new"
    for folder, part in ((old, files[:existing]), (new, files[existing:])):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        for f in part:
            shutil.copyfile(f, folder / f.name)
            (folder / f.name).read_bytes()  # the page cache holds every input for both contenders
    options = {"size": size, "shard_size": shard_size, "workers": workers}
    base = work / "base"
    shutil.rmtree(base, ignore_errors=True)
    run_ingest(synth.ingest_config(base, dicom_dir=old, **options))

    def alone() -> float:
        out = work / "alone"
        shutil.rmtree(out, ignore_errors=True)
        os.sync()
        t = time.perf_counter()
        run_ingest(synth.ingest_config(out, dicom_dir=new, **options))
        return time.perf_counter() - t

    def append() -> float:
        out = work / "appended"
        shutil.rmtree(out, ignore_errors=True)
        shutil.copytree(base, out)
        os.sync()
        t = time.perf_counter()
        summary = run_append(synth.ingest_config(out, dicom_dir=new, append=True, **options))
        seconds = time.perf_counter() - t
        if summary.skipped or summary.shards_built == 0:
            raise RuntimeError(f"the append skipped {summary.skipped} files and built {summary.shards_built} shards")
        return seconds

    rounds = []
    for i in range(repeat):
        if i % 2:
            a = append()
            b = alone()
        else:
            b = alone()
            a = append()
        rounds.append((a, b))
    ratios = [a / b for a, b in rounds]
    median = statistics.median(ratios)
    lines = [
        f"append: {n} new files to a dataset of {existing} samples ({image_size} px sources, {size} px out, "
        f"shard size {shard_size}, {workers} workers, {repeat} rounds)",
        f"{'round':>5}  {'append s':>9}  {'alone s':>8}  {'ratio':>6}",
        *(f"{i + 1:>5}  {a:>9.2f}  {b:>8.2f}  {a / b:>6.3f}" for i, (a, b) in enumerate(rounds)),
        f"append / alone: median {median:.3f} (range {min(ratios):.3f}-{max(ratios):.3f}); "
        f"{'PASS' if median <= BOUND else 'FAIL'} (at most {BOUND})",
    ]
    return lines
