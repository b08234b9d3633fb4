"""``python -m ingest.bench``: ingest throughput against the naive loop and the floors.

Measured side by side in one run on synthetic RSNA-like files (1024x1024 JPEG Baseline):

(a) naive: what a user writes first: ``pydicom.dcmread(f).pixel_array`` -> CLAHE -> resize ->
    one PNG per image;
(b1) old floor: read + pydicom parse + OpenCV decode + CLAHE at 1024 + area resize to 640, in
    memory (the unavoidable work of ``--resample area``);
(b2) new floor: read (as the workers read) + locate the frame (header walk, no pydicom) +
    libjpeg-turbo decode at 5/8 scale + CLAHE at 640, in memory (the unavoidable work of
    ``--resample dct``);
(c) ours: ``run_ingest`` on a LocalCluster with 1 worker and with all cores, for both
    ``--resample`` values (hashing, JSON, npy, tar, Dask scheduling included; cluster
    start-up reported apart);
(d) the cost of the hardening in the one-worker time per image: the codestream header and
    end-marker checks, and ``strict=True`` against a lenient decode of the same frames;
(e) where the time per image goes: each step of a ``--resample dct`` sample, timed alone;
(f) what the machine itself allows on all cores: the (b2) loop split over one process per
    core, against one process (cores share caches, memory bandwidth and, on a VM, a host);
(g) what the QA flags and the SOP-class check cost: a worker's whole per-sample function
    (``process_sample``) with both on and with both off, alternating file by file (best of 5
    each, CPU time), as a share of ours' one-worker ``dct`` time per image in the same round.
    "Off" is made here, from outside: the flags computed as none, the judgement passed and the
    header walker reading the four elements it reads for them no more.

"Per process" rates are images per CPU second (the floors' loop; the worker process with all its
threads); "all cores" rates are wall-clock, first task to last. The table shows each contender's
best round; every ratio is taken within a round, between contenders run next to each other, and
reported as the median (and range) over the rounds. (b2) runs just before and just after ours'
one-worker ``dct`` run, and the per-process ratio takes the mean of the two.

(a), (b1), (d), (e) and (g) run on the first ``--floor-n`` files only: they are per-image rates in one
process, and (a) alone would take longer than everything else. (b2), its all-cores run and
ours run on all ``--n``: enough shards that the last one to finish is a small part of an
all-cores run.

The probe (one file's scaled decode + CLAHE, 200 times) is printed from before and after the
rounds, so that a run's absolute rates can be set beside another's; ``--probe`` takes it alone,
to bracket a timing of the full set.

``--archive`` runs another section alone: a zip or tar read in place against the same files
unpacked (:mod:`ingest.bench_archive`), by default on ``ARCHIVE_N`` files.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import logging
import multiprocessing
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pydicom
import pydicom.encaps
import simplejpeg

from ingest import codestream, dicom_header, qa, render, sop, transforms, worker
from ingest.bench_archive import run_archive_bench
from ingest.config import IngestConfig
from ingest.dicom import _read_raw, decode_dicom
from ingest.pipeline import run_ingest
from ingest.plan import PlannedSample
from ingest.readahead import read_file
from ingest.synth import SynthSummary, make_dataset
from shards.cli import configure_logging
from shards.writer import ShardWriter


def naive(files: list[Path], out: Path, size: int) -> float:
    """(a) pixel_array -> CLAHE -> resize -> PNG; returns CPU seconds."""
    out.mkdir(parents=True, exist_ok=True)
    clahe = cv2.createCLAHE(clipLimit=2.0, tileGridSize=(8, 8))
    t = time.process_time()
    for f in files:
        img = pydicom.dcmread(f).pixel_array.astype(np.uint8)
        img = cv2.resize(clahe.apply(img), (size, size), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(out / f"{f.stem}.png"), img)
    return time.process_time() - t


def old_floor(files: list[Path], size: int) -> float:
    """(b1) read + parse + OpenCV decode + CLAHE at full size + area resize; returns CPU seconds."""
    t = time.process_time()
    for f in files:
        ds = pydicom.dcmread(io.BytesIO(f.read_bytes()))
        frame = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        img = cv2.imdecode(np.frombuffer(frame, np.uint8), cv2.IMREAD_UNCHANGED)
        img = transforms.clahe(img, 2.0, 8)
        cv2.resize(img, (size, size), interpolation=cv2.INTER_AREA)
    return time.process_time() - t


def _frame(data: bytes) -> bytes:
    meta, body = dicom_header.read_meta(data)
    header = dicom_header.walk(data, body)
    assert header.pixel_data is not None
    return dicom_header.encapsulated_frame(data, header.pixel_data[0])


def _scaled_decode_clahe(frame: bytes, size: int) -> None:
    """The codecs' part of (b2): n/8 scaled decode, then CLAHE at the output size."""
    img = simplejpeg.decode_jpeg(frame, colorspace="GRAY", min_height=size, min_width=size)
    transforms.clahe(transforms.resize_area(img[..., 0], (size, size)), 2.0, 8)


def new_floor(files: list[Path], size: int) -> float:
    """(b2) read + locate the frame + n/8 scaled decode + CLAHE at the output size; CPU seconds."""
    t = time.process_time()
    for f in files:
        _scaled_decode_clahe(_frame(read_file(str(f))), size)
    return time.process_time() - t


PROBE_TIMES = 200  # about 1 s of decoding: short enough to bracket a run, long enough for a stable median
ARCHIVE_N = 256
"""Files of the ``--archive`` section by default: 4 shards of 64 per source and round."""


def probe(file: Path, size: int, times: int = PROBE_TIMES) -> float:
    """How fast this machine is right now: median wall ms of one file's scaled decode + CLAHE.

    Absolute rates and full-set times taken hours apart compare only through it: on a shared
    VM the same work has cost from 3.7 to 8.5 ms an image on different days.
    """
    frame = _frame(read_file(str(file)))
    spent = []
    for _ in range(times):
        t = time.perf_counter()
        _scaled_decode_clahe(frame, size)
        spent.append(time.perf_counter() - t)
    return statistics.median(spent) * 1e3


def timed_new_floor(files: list[Path], size: int) -> tuple[float, float]:
    """(b2) over ``files``: (CPU seconds, wall seconds)."""
    t = time.perf_counter()
    cpu = new_floor(files, size)
    return cpu, time.perf_counter() - t


def _floor_part(files: list[Path], size: int, ready: Any, spans: Any) -> None:
    cv2.setNumThreads(1)
    ready.wait()
    t = time.time()
    new_floor(files, size)
    spans.put((t, time.time()))


def floor_all_cores(files: list[Path], size: int, cores: int) -> float:
    """(f) wall seconds, first start to last end, of (b2) over ``files`` split across ``cores``
    processes, each started and ready before the clock starts."""
    ctx = multiprocessing.get_context("spawn")
    ready, spans = ctx.Barrier(cores + 1), ctx.Queue()
    procs = [ctx.Process(target=_floor_part, args=(files[i::cores], size, ready, spans)) for i in range(cores)]
    for proc in procs:
        proc.start()
    ready.wait()
    got = [spans.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join()
    return max(end for _, end in got) - min(start for start, _ in got)


def hardening(files: list[Path], size: int) -> tuple[float, float]:
    """(d) CPU seconds per image of the header checks, and of strict minus lenient decoding.

    Strict and lenient decodes alternate frame by frame (best of 3 each) and are timed in CPU
    time, so that a load that drifts during the run does not land on one side only.
    """
    frames = [_frame(f.read_bytes()) for f in files]
    t = time.process_time()
    for fr in frames:
        geom = codestream.frame_geometry(fr, pydicom.uid.JPEGBaseline8Bit)
        assert geom is not None and codestream.check_end_marker(fr)
    checks = time.process_time() - t
    extra = 0.0
    for fr in frames:
        best = {}
        for strict in (False, True) * 3:
            t = time.process_time()
            simplejpeg.decode_jpeg(fr, colorspace="GRAY", min_height=size, min_width=size, strict=strict)
            best[strict] = min(best.get(strict, 1e9), time.process_time() - t)
        extra += best[True] - best[False]
    return checks / len(frames), extra / len(frames)


QA_TRIES = 5
"""(g) runs each file this many times each way, alternating, and keeps the fastest of each."""
QA_AND_SOP_TAGS = frozenset((dicom_header.SOP_CLASS_UID, dicom_header.MEDIA_STORAGE_SOP_CLASS_UID,
                              dicom_header.BODY_PART_EXAMINED, dicom_header.BURNED_IN_ANNOTATION))
"""The header elements the walker reads only for the QA flags and the SOP-class judgement."""


@contextlib.contextmanager
def without_qa_and_sop() -> Iterator[None]:
    """(g)'s "off": no QA flags, no SOP-class judgement, no header elements read for them."""
    saved = render.qa_flags, sop.judge, dicom_header._WANTED
    render.qa_flags, sop.judge = (lambda decoded: []), (lambda uid, policy: None)
    dicom_header._WANTED = saved[2] - QA_AND_SOP_TAGS
    try:
        yield
    finally:
        render.qa_flags, sop.judge, dicom_header._WANTED = saved


def qa_and_sop_cost(files: list[Path], size: int) -> float:
    """(g) CPU seconds per image that the QA flags and the SOP-class check add to
    ``process_sample`` (on minus off, alternating file by file, best of :data:`QA_TRIES` each)."""
    processing = IngestConfig(dicom_dir=".", out=".", size=size).processing_params()
    extra = 0.0
    for f in files:
        data = read_file(str(f))
        sample = PlannedSample(f.stem, f.stem, f.name, "train", 0, None, ())
        best: dict[bool, float] = {}
        for on in (False, True) * QA_TRIES:
            with contextlib.nullcontext() if on else without_qa_and_sop():
                t = time.process_time()
                worker.process_sample(data, sample, processing)
                best[on] = min(best.get(on, 1e9), time.process_time() - t)
        extra += best[True] - best[False]
    return extra / len(files)


def steps(files: list[Path], size: int, work: Path) -> list[tuple[str, float]]:
    """(e) CPU milliseconds per image of each step of a ``dct`` sample, each timed over all
    files (CPU time: on a shared machine it moves less than wall time)."""
    out: list[tuple[str, float]] = []

    def timed(name: str, fn, inputs: list) -> list:
        t = time.process_time()
        results = [fn(x) for x in inputs]
        out.append((name, (time.process_time() - t) / len(inputs) * 1e3))
        return results

    datas = timed("read the file", lambda f: read_file(str(f)), files)
    timed("sha256 of the source (provenance)", lambda d: hashlib.sha256(d).hexdigest(), datas)
    headers = timed("header walk + frame location (no pydicom)", _read_raw, datas)
    frames = [h.frame for h in headers]
    timed("SOP-class judgement (from the walked header)", lambda h: sop.judge(h.sop_class, "radiograph"), headers)
    timed("(for comparison: pydicom dcmread)", lambda d: pydicom.dcmread(io.BytesIO(d)), datas)
    timed("codestream checks (SOF, end marker)",
          lambda fr: codestream.check_end_marker(fr) and codestream.frame_geometry(fr, pydicom.uid.JPEGBaseline8Bit), frames)
    pixels = timed("5/8 DCT-domain decode (strict)", lambda fr: codestream.decode_jpeg(fr, (size, size)), frames)
    images = timed("CLAHE at the output size", lambda img: transforms.clahe(img, 2.0, 8), pixels)
    decoded = [decode_dicom(d, fit=size) for d in datas]
    timed("QA flags (histogram, column bands, header rules)", qa.qa_flags, decoded)
    meta = {"key": "k", "patient_id": "k", "source": {"path": "k.dcm", "sha256": "0" * 64}, "split": "train",
            "target": 0, "class": "Normal", "boxes": [], "transform": {}, "view_position": "PA", "sex": "M", "age": 40,
            "qa": []}
    with ShardWriter(work / "steps.tar") as writer:
        timed("shard write (npy + json + tar + sha256)",
              lambda ki: writer.write(f"k{ki[0]}", ki[1], {**meta, "key": f"k{ki[0]}"}), list(enumerate(images)))
    return out


def ours(synth: SynthSummary, out: Path, workers: int, shard_size: int, resample: str) -> dict[str, float]:
    """(c) the real ingest; returns wall seconds, busy seconds and peak worker RSS."""
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    summary = run_ingest(synth.ingest_config(out, workers=workers, shard_size=shard_size, resample=resample))
    wall = time.perf_counter() - t
    recs = summary.records
    span = max(r.stats.finished for r in recs) - min(r.stats.started for r in recs)
    return {
        "wall": wall,
        "span": span,
        "busy": sum(r.stats.seconds for r in recs),
        "cpu": sum(r.stats.cpu_seconds for r in recs),
        "rss": max(r.stats.max_rss_mb for r in recs),
        "samples": summary.counts["samples"],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ingest.bench", description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, help=f"synthetic images (1024x1024; default 1024, {ARCHIVE_N} with --archive)")
    p.add_argument("--floor-n", type=int, default=256, help="images for (a), (b1), (d) and (e) (at most --n)")
    p.add_argument("--shard-size", type=int, default=64, help="samples per shard (tasks = n / shard size)")
    p.add_argument("--repeat", type=int, default=3, help="rounds (every contender once each); ratios are medians over them")
    p.add_argument("--workdir", type=Path, help="keep data here (default: a temp folder)")
    p.add_argument("--probe", action="store_true",
                   help=f"only time the probe (one file's 5/8 decode + CLAHE, {PROBE_TIMES} times) and exit: "
                        "take it before and after a run whose absolute figures you keep")
    p.add_argument("--archive", action="store_true",
                   help="only compare ingesting a zip / tar in place with the unpacked folder, on all cores")
    p.add_argument("--append", action="store_true",
                   help="only compare appending --n new files (default 200) to a dataset of --existing samples "
                        "with ingesting them alone, on all cores")
    p.add_argument("--existing", type=int, default=1000, metavar="N", help="samples of the dataset --append appends to")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(level=logging.WARNING)
    cv2.setNumThreads(1)  # like each ingest worker: the comparison is per process
    cores = os.cpu_count() or 1
    size = 640
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ingest-bench-"))
    if args.probe:
        synth = make_dataset(work / "probe", 1, seed=0, size=1024, progress=False)
        print(f"probe: {probe(next(synth.images_dir.glob('*.dcm')), size):.2f} ms "
              f"(one core: one file's 5/8 decode + CLAHE at {size}, median of {PROBE_TIMES})")
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.archive:
        n = args.n or ARCHIVE_N
        print("\n".join(run_archive_bench(work, n, args.shard_size, args.repeat, cores)))
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.append:
        from ingest.bench_append import run_append_bench

        print("\n".join(run_append_bench(work, args.existing, args.n or 200, args.shard_size, args.repeat, cores)))
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    args.n = args.n or 1024
    synth = make_dataset(work / "synth", args.n, seed=0, size=1024, progress=False)
    files = sorted(synth.images_dir.glob("*.dcm"))
    for f in files:  # warm the page cache so every contender reads from memory
        f.read_bytes()
    few = files[: max(1, min(args.floor_n, len(files)))]
    probe_before = probe(files[0], size)

    # Every round runs every contender once, in an order that puts each ratio's two sides next
    # to each other: this machine's speed drifts by 15-40% from minute to minute, so a ratio is
    # taken within each round and the median over the rounds is reported (with its range).
    # The rates in the table are each contender's best round.
    widths = list(dict.fromkeys((1, cores)))
    rounds: list[dict[Any, Any]] = []
    for _ in range(args.repeat):
        r: dict[Any, Any] = {"naive": naive(few, work / "png", size), "b1": old_floor(few, size)}
        for w in widths:
            r[(w, "area")] = ours(synth, work / f"o{w}area", w, args.shard_size, "area")
        for w in widths[1:]:  # all cores first: the one-worker run goes between two runs of (b2)
            r[(w, "dct")] = ours(synth, work / f"o{w}dct", w, args.shard_size, "dct")
        b2_before, _ = timed_new_floor(files, size)
        r[(1, "dct")] = ours(synth, work / "o1dct", 1, args.shard_size, "dct")
        b2_after, r["b2 wall"] = timed_new_floor(files, size)
        # (b2) on both sides of the run it is compared with: a drift in the machine's speed
        # during the three runs weighs on both sides of the per-process ratio alike.
        r["b2"] = (b2_before + b2_after) / 2
        r["b2 all cores"] = floor_all_cores(files, size, cores)
        r["qa+sop"] = qa_and_sop_cost(few, size)
        rounds.append(r)
    checks, strict_extra = hardening(few, size)
    breakdown = steps(few, size, work)
    probe_after = probe(files[0], size)
    n, n_few = len(files), len(few)

    def per_cpu(run: dict[str, float]) -> float:
        """Images per CPU second of the worker process: its read-ahead and flusher threads
        count wherever they ran (in a one-worker run they can use an idle core, so the task's
        wall time would flatter it)."""
        return run["samples"] / run["cpu"]

    def per_wall(run: dict[str, float]) -> float:
        return run["samples"] / run["span"]

    def best(key: Any, rate: Any) -> float:
        return max(rate(r[key]) for r in rounds)

    def paired(ratio: Any) -> str:
        vals = sorted(ratio(r) for r in rounds)
        return f"{statistics.median(vals):5.2f}" + (f" ({vals[0]:.2f}-{vals[-1]:.2f})" if len(vals) > 1 else "")

    def scaling(r: dict[Any, Any], mode: str) -> float:
        """Ours on all cores against cores x ours on one worker (wall-clock rates)."""
        return per_wall(r[(cores, mode)]) / (cores * per_wall(r[(1, mode)]))

    def floor_scaling(r: dict[Any, Any]) -> float:
        """(f): (b2) split over the cores against cores x (b2) in one process."""
        return r["b2 wall"] / (cores * r["b2 all cores"])

    def floor(seconds: float) -> float:
        """Images per CPU second of (b2)'s loop."""
        return n / seconds

    def few_floor(seconds: float) -> float:
        """Images per CPU second of a loop over the ``--floor-n`` files."""
        return n_few / seconds

    rows = [
        ("(a) naive: pixel_array -> CLAHE -> resize -> PNG (per CPU second)", best("naive", few_floor), "1 process"),
        ("(b1) old floor: parse + OpenCV decode + CLAHE 1024 + resize (per CPU second)", best("b1", few_floor), "1 process"),
        ("(b2) new floor: 5/8 DCT decode + CLAHE 640 (per CPU second)", best("b2", floor), "1 process"),
        (f"(f) new floor split over {cores} processes (wall)", max(n / r["b2 all cores"] for r in rounds), f"{cores} processes"),
    ]
    for mode in ("dct", "area"):
        rows += [
            (f"(c) ours --resample {mode}, 1 worker (per CPU second)", best((1, mode), per_cpu), "1 worker"),
            (f"(c) ours --resample {mode}, 1 worker (wall)", best((1, mode), per_wall), "1 worker"),
            (f"(c) ours --resample {mode}, {cores} workers (wall)", best((cores, mode), per_wall), f"{cores} workers"),
        ]
    print(f"ingest bench: {n} synthetic 1024x1024 JPEG Baseline DICOMs -> {size}x{size}, shard size {args.shard_size}, "
          f"{cores} cores, {args.repeat} rounds; (a), (b1), (d), (e), (g) on the first {n_few}")
    print(f"probe before / after: {probe_before:.2f} / {probe_after:.2f} ms (one file's 5/8 decode + CLAHE: "
          "how fast this machine was; rates from runs with other probes do not compare)\n")
    print(f"| {'contender (best round)':78} | images/s | where      |")
    print(f"|{'-' * 80}|----------|------------|")
    for name, rate, where in rows:
        print(f"| {name:78} | {rate:8.1f} | {where:10} |")
    one_worker_s = 1 / best((1, "dct"), per_cpu)
    print(f"\nratios within each round, median (range) over {args.repeat} rounds:\n")
    print(f"old floor / naive                          = {paired(lambda r: r['naive'] / r['b1'])}")
    print(f"new floor / old floor                      = {paired(lambda r: r['b1'] / n_few / (r['b2'] / n))}")
    print(f"ours dct per process / new floor (b2)      = {paired(lambda r: per_cpu(r[(1, 'dct')]) * r['b2'] / n)}   (target >= 0.8)")
    print(f"ours dct per process / old floor (b1)      = {paired(lambda r: per_cpu(r[(1, 'dct')]) * r['b1'] / n_few)}   (about 2x expected)")
    print(f"ours area per process / old floor (b1)     = {paired(lambda r: per_cpu(r[(1, 'area')]) * r['b1'] / n_few)}")
    for mode in ("dct", "area"):
        ratio = paired(lambda r, m=mode: scaling(r, m))
        print(f"ours {mode:4} all cores / (cores x 1 worker) = {ratio}   (target >= 0.90)")
    print(f"(f) new floor, the same ratio              = {paired(floor_scaling)}"
          "   (what this machine allows: no glue, no Dask)")
    print(f"ours dct all cores ratio / (f)'s           = {paired(lambda r: scaling(r, 'dct') / floor_scaling(r))}"
          "   (1.0: Dask and the glue lose nothing on all cores beyond what the machine does)")
    print(f"hardening: header checks {checks * 1e6:.0f} us + strict decode {strict_extra * 1e6:+.0f} us per image "
          f"= {(checks + strict_extra) / one_worker_s * 100:+.1f}% of the dct one-worker time per image (target < 5%)")
    print(f"QA flags + SOP-class check: {statistics.median(r['qa+sop'] for r in rounds) * 1e6:.0f} us per image "
          f"(median) = {paired(lambda r: 100 * r['qa+sop'] * per_cpu(r[(1, 'dct')]))} % of the dct one-worker "
          "time per image   (target < 3%)")
    print(f"peak RSS per worker process                = {max(r[k]['rss'] for r in rounds for k in r if isinstance(k, tuple)):5.0f} MB (target < 500 MB)")
    print("\n(e) where the time of one dct sample goes (each step timed alone, 1 process, CPU time):\n")
    print("| step | CPU ms per image |")
    print("|---|---:|")
    for name, ms in breakdown:
        print(f"| {name} | {ms:.3f} |")
    print(f"| all but the comparison row | {sum(ms for name, ms in breakdown if not name.startswith('(')):.3f} |")
    print()
    last = rounds[-1][(cores, "dct")]
    print(f"cluster start-up + planning + finish       = {last['wall'] - last['span']:.1f} s (all cores run, last round, not in the rates)")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
