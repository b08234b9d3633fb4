"""``python -m ingest.bench --archive``: ingesting a zip or tar in place against the same files
unpacked in a folder, as ratios.

One synthetic set is written to a folder and packed as the competition ships it (a deflated
zip, a stored zip, a tar, the images under ``stage_2_train_images/``). Every round ingests
each source once, on all cores, the folder between the archives; each archive's rate is
divided by the folder's rate in the same round, and the median (and range) over the rounds
is reported. Two phases are timed apart: the listing (:func:`shards.source.discover`: a folder
walk with stats, against one read of the archive's index) and the shards (first task to last,
images per second of wall time; and CPU seconds per image, summed over the workers).

Every source is read once before the rounds, so all of them are read from the page cache:
the ratio is the cost of reading in place (a ``pread`` per member, inflating a deflated one,
checking its CRC-32), not of the disk. On a parallel filesystem the archive also spares the
metadata server one open and one stat per file, which no local run shows.
"""

from __future__ import annotations

import dataclasses
import shutil
import statistics
import time
from pathlib import Path

from ingest.pipeline import run_ingest
from ingest.synth import SynthSummary, make_dataset
from ingest.synth_archive import TRAIN_MEMBERS, pack_archive
from shards.source import discover

SOURCES = ("folder", "zip deflate", "zip stored", "tar")


@dataclasses.dataclass(frozen=True)
class Run:
    """One ingest of one source."""

    listing_s: float
    """:func:`shards.source.discover` alone, seconds."""
    span_s: float
    """First shard task started to last one finished, seconds."""
    cpu_s: float
    """CPU seconds of the shard tasks' worker processes, summed."""
    samples: int

    @property
    def rate(self) -> float:
        """Images per second of wall time while shards were built."""
        return self.samples / self.span_s

    @property
    def cpu_ms(self) -> float:
        return self.cpu_s / self.samples * 1e3


def _ingest(synth: SynthSummary, source: Path, members: str | None, out: Path, workers: int, shard_size: int) -> Run:
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    discover(source, members)
    listing = time.perf_counter() - t
    summary = run_ingest(
        synth.ingest_config(out, dicom_dir=source, members=members, workers=workers, shard_size=shard_size)
    )
    recs = summary.records
    span = max(r.stats.finished for r in recs) - min(r.stats.started for r in recs)
    return Run(listing, span, sum(r.stats.cpu_seconds for r in recs), summary.counts["samples"])


def run_archive_bench(work: Path, n: int, shard_size: int, repeat: int, workers: int) -> list[str]:
    """Run the comparison; returns the lines to print (a table and the ratios)."""
    synth = make_dataset(work / "synth", n, seed=0, size=1024, progress=False)
    sources = {
        "folder": (synth.images_dir, None),
        "zip deflate": (pack_archive(synth.out, work / "deflate.zip"), TRAIN_MEMBERS),
        "zip stored": (pack_archive(synth.out, work / "stored.zip", stored=True), TRAIN_MEMBERS),
        "tar": (pack_archive(synth.out, work / "rsna.tar"), TRAIN_MEMBERS),
    }
    for f in [*synth.images_dir.rglob("*.dcm"), *(p for p, _ in list(sources.values())[1:])]:
        f.read_bytes()  # into the page cache: every source is read from memory
    order = ["zip deflate", "folder", "zip stored", "tar"]  # the folder next to the archive most use
    rounds: list[dict[str, Run]] = []
    for _ in range(repeat):
        rounds.append({
            name: _ingest(synth, sources[name][0], sources[name][1], work / "out", workers, shard_size)
            for name in order
        })
    shutil.rmtree(work / "out", ignore_errors=True)

    def paired(values: list[float]) -> str:
        vals = sorted(values)
        return f"{statistics.median(vals):5.2f}" + (f" ({vals[0]:.2f}-{vals[-1]:.2f})" if len(vals) > 1 else "")

    lines = [
        f"archive bench: {n} synthetic 1024x1024 JPEG Baseline DICOMs, shard size {shard_size}, {workers} workers, "
        f"{repeat} rounds, every source read from the page cache",
        "",
        f"| {'source (best round)':20} | listing ms | images/s (wall) | worker CPU ms/image |",
        f"|{'-' * 22}|-----------:|----------------:|--------------------:|",
    ]
    for name in SOURCES:
        best = max((r[name] for r in rounds), key=lambda run: run.rate)
        lines.append(f"| {name:20} | {best.listing_s * 1e3:10.1f} | {best.rate:15.1f} | {best.cpu_ms:19.2f} |")
    lines += ["", f"ratios to the folder within each round, median (range) over {repeat} rounds:", ""]
    for name in SOURCES[1:]:
        lines.append(f"{name:11} / folder: images/s {paired([r[name].rate / r['folder'].rate for r in rounds])}"
                     f"   CPU per image {paired([r[name].cpu_ms / r['folder'].cpu_ms for r in rounds])}"
                     f"   listing {paired([r[name].listing_s / r['folder'].listing_s for r in rounds])}")
    return lines
