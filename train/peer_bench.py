"""Our shard loader against its peers, side by side in one run (``python -m train.bench
--loader-only``).

The same ``n`` samples (640x640 uint8 and their JSON, written once by
:class:`shards.writer.ShardWriter` into a dataset folder) are read, from the page cache,
batch 32, one process, every image read in full, by:

* ours: :class:`train.data.ShardLoader`, :data:`LANES` lanes (every sample checked against
  its xxh3 digests) on its default two reader threads, and again with none (the lanes read
  in the consumer's thread); both also with a 5 ms idle step per batch, which the threads
  overlap;
* plain webdataset: ``WebDataset(urls).decode().to_tuple("npy", "json").batched(32)``;
* MosaicML Streaming: the samples converted once by ``MDSWriter`` (a fixed-shape uint8
  column), read by ``StreamingDataset`` and a torch ``DataLoader``;
* LitData: converted once by ``optimize`` (the image's raw bytes), read by
  ``StreamingDataset(batch_decode=1)`` and ``StreamingDataLoader``;
* ours again with 2 loader worker processes;
* the floor: each image's bytes read into a reused row and hashed, nothing else (what any
  checked read of these files costs on this machine; see :func:`_floor`).

Ours and the two peers read in a shuffled order; the peers also in their stored order (the
rows marked "unshuffled"), and webdataset reads in file order (its shuffle is a buffer of
decoded samples, which would cost it memory copies the others do not make).

The peers need numpy < 2.2 and pull torchvision (and with it a CUDA build of torch): they run
in a virtual environment of their own, made once under ``~/.cache/pneumo-hpc/peers-venv``
(:data:`PEER_PINS`: torch 2.13.0 from its CPU wheel first, then the peers without their
dependencies and the runtime dependencies they import by hand), in a subprocess
(:mod:`train.peers_run`) that times its own epoch. Each round runs every loader once; the
ratios are taken within a round and the medians over rounds are printed. Every loader runs
with one torch thread (``torch.set_num_threads(1)``): the peers' collate stacks each batch
with ``torch.stack``, which with two OpenMP threads on a 2-core machine shared with other
work took 12 ms per 640x640 image instead of 0.6 ms.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

PEERS_VENV = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "pneumo-hpc" / "peers-venv"
"""Where the peers' environment is made once and reused."""
PEER_PINS = (
    # torch first, alone: its CPU wheel, so that nothing after it asks for a CUDA build.
    ("torch==2.13.0", "numpy==2.1.3"),
    # The peers themselves, without their dependencies (both list torchvision).
    ("--no-deps", "mosaicml-streaming==0.13.0", "litdata==0.2.76"),
    # What they import when reading local files (Streaming imports transformers and PIL at
    # import time; LitData boto3).
    ("xxhash==3.8.2", "zstd==1.5.7.2", "python-snappy==0.7.3", "Brotli==1.2.1", "tqdm==4.70.1",
     "catalogue==2.0.10", "transformers==4.57.6", "pillow==13.0.0", "boto3==1.44.18",
     "lightning-utilities", "filelock", "requests", "tifffile"),
)
RUNNER = Path(__file__).with_name("peers_run.py")
THREADS = 1
"""torch's intra-op threads in every loader's process (see the module docstring)."""
BATCH = 32
LANES = 2
"""Our loader's lanes: two, one per worker process in the 2-worker run (the training default
for batch 32, 16 lanes, holds 16 shuffle windows of pending batches: slower per process)."""


class PeersUnavailable(RuntimeError):
    """The peers' environment could not be made (no registry to install from, say)."""


def peers_python(venv: Path = PEERS_VENV, *, create: bool = True) -> Path:
    """The peers' interpreter, the environment made first if it is not there (a few minutes).

    Raises:
        PeersUnavailable: It is missing and ``create`` is false, or an install failed.
    """
    python = venv / "bin" / "python"
    ready = venv / ".pneumo-ready"
    if ready.is_file() and ready.read_text() == repr(PEER_PINS):
        return python
    if not create:
        raise PeersUnavailable(f"no peers environment at {venv} (the bench makes it when run)")
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True, capture_output=True)
        for step in PEER_PINS:
            subprocess.run([str(python), "-m", "pip", "install", "-q", *step], check=True, capture_output=True,
                           text=True)
        subprocess.run([str(python), str(RUNNER), "--help"], check=True, capture_output=True)
    except subprocess.CalledProcessError as exc:
        raise PeersUnavailable(f"making the peers environment at {venv} failed: "
                               f"{' '.join(map(str, exc.cmd))}: {(exc.stderr or '').strip()[-500:]}") from None
    ready.write_text(repr(PEER_PINS))
    return python


def make_dataset(root: Path, n: int, *, size: int = 640, shard_size: int = 256, seed: int = 0) -> Path:
    """``n`` training samples of ``size`` pixels in a dataset folder (format current),
    written straight by the shard writer (no DICOM, no ingest); reused when already there."""
    from shards.format import FORMAT_VERSION, shard_name
    from shards.labels import LabelRow, LabelTable, write_labels
    from shards.manifest import LABELS_NAME, SHARDS_DIR, Manifest, read_manifest, write_manifest
    from shards.writer import ShardWriter

    try:
        if sum(s.samples for s in read_manifest(root).shards) == n:
            return root
    except (FileNotFoundError, ValueError):
        pass
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (size, size), dtype=np.uint8)
    infos, rows = [], []
    for k, lo in enumerate(range(0, n, shard_size)):
        with ShardWriter(root / SHARDS_DIR / shard_name("train", k), split="train") as w:
            for i in range(lo, min(n, lo + shard_size)):
                key = f"bench{i:06d}"
                target = int(i % 3 == 0)
                meta = {"key": key, "patient_id": key, "source": {"path": f"{key}.dcm", "sha256": "0" * 64},
                        "split": "train", "target": target, "class": "Lung Opacity" if target else "Normal",
                        "boxes": [[100.0, 120.0, 300.0, 360.0]] if target else [],
                        "transform": {"scale": 0.625, "pad_x": 0.0, "pad_y": 0.0, "src_rows": 1024, "src_cols": 1024},
                        "view_position": "PA", "sex": "F", "age": 40, "qa": []}
                w.write(key, np.roll(base, i, axis=1), meta)
                rows.append(LabelRow.from_meta(meta, k))
        assert w.result is not None
        infos.append(w.result)
    write_labels(root / LABELS_NAME, LabelTable.from_rows(rows))
    write_manifest(root, Manifest(format_version=FORMAT_VERSION, params={"size": size}, params_hash="",
                                  packages={}, source={}, counts={}, shards=infos))
    return root


def _ours(data: Path, workers: int, threads: int | None = None, step_s: float = 0.0) -> dict[str, float]:
    """One epoch of our loader from a fresh :class:`ShardLoader` (``threads`` None: its default),
    the consumer sleeping ``step_s`` per batch (a training step that leaves the CPU idle, as
    one waiting on a GPU does)."""
    from train.data import ShardLoader, read_split

    info = read_split(data, "train")
    t0, c0 = time.perf_counter(), time.process_time()
    loader = ShardLoader(info, rank=0, world=1, global_batch=BATCH, lanes=LANES, workers=workers, seed=0,
                         threads=threads)
    first = None
    for _ in loader.epoch(0):
        if first is None:
            first = time.perf_counter() - t0
        if step_s:
            time.sleep(step_s)
    # The epoch's padding slots (fewer than a batch) repeat samples: not counted.
    return {"samples": info.samples, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "first_batch_s": first or 0.0}


def _floor(data: Path) -> dict[str, float]:
    """What the machine allows a checked read of the same samples: each image's bytes read
    with one ``preadv`` into a reused batch row and hashed (xxh3-128), in file order, with no
    tar, JSON or batch work at all (the offsets are found before the clock starts)."""
    import tarfile

    import xxhash

    from shards.manifest import SHARDS_DIR

    spans = []
    for path in sorted((data / SHARDS_DIR).glob("*.tar")):
        with tarfile.open(path) as tar:
            spans.append((path, [(m.offset_data, m.size) for m in tar if m.name.endswith(".npy")]))
    rows = np.ones((BATCH, SIZE * SIZE + 256), np.uint8)  # mapped already, as the loader's pooled rows
    t0, c0 = time.perf_counter(), time.process_time()
    n = 0
    for path, members in spans:
        fd = os.open(path, os.O_RDONLY)
        try:
            for offset, size in members:
                row = rows[n % BATCH, :size]
                os.preadv(fd, [row], offset)
                xxhash.xxh3_128_digest(row)
                n += 1
        finally:
            os.close(fd)
    seconds = time.perf_counter() - t0
    return {"samples": n, "seconds": seconds, "cpu_seconds": time.process_time() - c0, "first_batch_s": 0.0}


def _webdataset(data: Path) -> dict[str, float]:
    import webdataset as wds

    from shards.manifest import SHARDS_DIR

    urls = sorted(str(p) for p in (data / SHARDS_DIR).glob("*.tar"))
    t0, c0 = time.perf_counter(), time.process_time()
    n, first = 0, None
    for images, _ in wds.WebDataset(urls, shardshuffle=False).decode().to_tuple("npy", "json").batched(BATCH):
        if first is None:
            first = time.perf_counter() - t0
        n += len(images)
    return {"samples": n, "seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0,
            "first_batch_s": first or 0.0}


def _run(cmd: list[str]) -> str:
    """Run a peers' command; its stdout, or a RuntimeError ending with its stderr."""
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd[1:3])} failed (exit {done.returncode}): {done.stderr.strip()[-1000:]}")
    return done.stdout


def _peer(python: Path, which: str, root: Path, *, size: int, shuffle: bool) -> dict[str, float]:
    out = _run([str(python), str(RUNNER), "read", which, str(root), "--batch", str(BATCH), "--size", str(size),
                *([] if shuffle else ["--no-shuffle"])])
    return json.loads(out.strip().splitlines()[-1])


STEP_S = 0.005
"""The idle training step of the overlap rows ("... 5 ms step"): 2,700 samples sleep 0.43 s."""
LOADERS = ("ours", "ours, no reader threads", "ours, 5 ms step", "ours, no reader threads, 5 ms step",
           "webdataset", "streaming", "streaming, unshuffled", "litdata", "litdata, unshuffled",
           "ours, 2 workers", "floor: preadv + xxh3 alone")
CONVERSION = 2
"""The layout of the peers' copies (:func:`train.peers_run.convert`): a copy made with another
is made again."""
SIZE = 640
"""The images' side."""


def peer_bench(work: Path, *, n: int = 2700, rounds: int = 3, peers: bool = True) -> dict[str, Any]:
    """Run every loader ``rounds`` times on the same ``n`` samples under ``work`` (made once,
    kept for the next run); return the per-round results and their medians."""
    data = make_dataset(work / "ours", n, size=SIZE)
    python = None
    if peers:
        python = peers_python()
        done = f"{n} samples, conversion {CONVERSION}"
        if not (work / "converted").is_file() or (work / "converted").read_text() != done:
            for out in (work / "mds", work / "litdata"):
                shutil.rmtree(out, ignore_errors=True)
            _run([str(python), str(RUNNER), "convert", str(data / "shards"), str(work / "mds"), str(work / "litdata")])
            (work / "converted").write_text(done)
    for p in work.rglob("*"):  # into the page cache, for every loader alike
        if p.is_file():
            p.read_bytes()
    runs: list[dict[str, dict[str, float]]] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(THREADS)
    try:
        for _ in range(rounds):
            r = {"ours": _ours(data, 0), "ours, no reader threads": _ours(data, 0, threads=0),
                 "ours, 5 ms step": _ours(data, 0, step_s=STEP_S),
                 "ours, no reader threads, 5 ms step": _ours(data, 0, threads=0, step_s=STEP_S),
                 "webdataset": _webdataset(data)}
            if python is not None:
                for name, which in (("streaming", "mds"), ("litdata", "litdata")):
                    r[name] = _peer(python, which, work / which, size=SIZE, shuffle=True)
                    r[f"{name}, unshuffled"] = _peer(python, which, work / which, size=SIZE, shuffle=False)
            r["ours, 2 workers"] = _ours(data, 2)
            r["floor: preadv + xxh3 alone"] = _floor(data)
            runs.append(r)
    finally:
        torch.set_num_threads(threads)
    return {"n": n, "rounds": runs}


def table(result: dict[str, Any]) -> str:
    """The median samples/s, ratios (taken within each round), CPU us/sample and time to the
    first batch of every loader, as markdown."""
    runs = result["rounds"]
    names = [k for k in LOADERS if k in runs[0]]

    def med(f) -> float:
        return statistics.median(f(r) for r in runs)

    rate = {k: med(lambda r, k=k: r[k]["samples"] / r[k]["seconds"]) for k in names}
    lines = [f"loader bench: {result['n']} samples {SIZE}x{SIZE} uint8 + JSON, batch {BATCH}, one process unless "
             f"said, shuffled unless said (webdataset: file order), page cache warm; medians of {len(runs)} rounds "
             "(ratios within each round)", "",
             "| loader | samples/s | ours / it | CPU us/sample | first batch s |", "|---|---:|---:|---:|---:|"]
    for k in names:
        ratio = "" if k.startswith("ours") else \
            f"{med(lambda r, k=k: (r['ours']['samples'] / r['ours']['seconds']) / (r[k]['samples'] / r[k]['seconds'])):.2f}x"
        cpu = "" if k == "ours, 2 workers" or "step" in k else f"{med(lambda r, k=k: 1e6 * r[k]['cpu_seconds'] / r[k]['samples']):.0f}"
        lines.append(f"| {k} | {rate[k]:,.0f} | {ratio} | {cpu} | {med(lambda r, k=k: r[k]['first_batch_s']):.3f} |")
    return "\n".join(lines)
