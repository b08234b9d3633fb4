"""Section ``remote`` of ``python -m shards.bench``: the training loader from local disk, from
an HTTP server with a cold cache and with a warm one, side by side in one run.

The server is nginx on loopback started by ``python -m tools.serve http`` (the command users
run), serving the bench's dataset folder. Every contender is :class:`train.data.ShardLoader`
in this process (``workers=0``) over the ``train`` split, global batch 32 in 4 lanes, and each
reads every byte it uses through the same sha256 check:

* local: the dataset folder, page cache warm;
* HTTP, cold cache: an empty ``--cache-dir``; shards are fetched (2 ahead of the reader per
  lane, on a helper thread), written to the cache, read back and hashed, and the reader parses the
  downloaded bytes (no second hash);
* HTTP, warm cache: the same cache, as the next run (or epoch) finds it: each copy is read
  and hashed against the manifest before reuse (on the prefetch thread), and the reader
  parses those bytes (no second hash).

Targets: warm >= 0.9x local, cold >= 0.5x local. Needs the ``train`` and ``remote`` extras and
nginx (installed from Debian by ``tools.serve`` when run as root).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shards.bench_common import BenchData, Section
from shards.manifest import SHARDS_DIR


def _epoch_rate(location: Any, cache_dir: Path | None, batch: int, lanes: int) -> tuple[float, float]:
    """(samples/s over one epoch, seconds to its first batch)."""
    from shards.origin import open_origin
    from train.data import ShardLoader, read_split

    info = read_split(open_origin(location, cache_dir=cache_dir), "train")
    loader = ShardLoader(info, rank=0, world=1, global_batch=batch, lanes=lanes, workers=0)
    t0 = time.perf_counter()
    first = None
    for _ in loader.epoch(0):
        if first is None:
            first = time.perf_counter() - t0
    return info.samples / (time.perf_counter() - t0), first or 0.0


def remote_bench(data: Path, work: Path, *, repeat: int = 5, batch: int = 32, lanes: int = 4) -> dict[str, Any]:
    """Samples/s of the loader (local, HTTP cold cache, HTTP warm cache) in ``repeat`` rounds.

    A round measures the three back to back, so that its ratios to local compare runs made
    under the same load; the order rotates from round to round (cold always before the warm
    run that reuses its cache), and the median ratio over the rounds is reported: on a shared
    machine one epoch's rate moves by 2x from round to round, a paired ratio far less.
    """
    state = work / "nginx-state"
    done = subprocess.run([sys.executable, "-m", "tools.serve", "http", str(data.parent), "--detach",
                           "--state", str(state), "--json"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"python -m tools.serve http failed: {done.stderr.strip()}")
    url = json.loads(done.stdout)["url"] + data.name
    rates: dict[str, list[float]] = {"local": [], "cold": [], "warm": []}
    first: dict[str, list[float]] = {"local": [], "cold": [], "warm": []}
    try:
        # The bench has just written the dataset: its write-back must not share the disk with
        # the first rounds' cache writes.
        os.sync()
        for s in (data / SHARDS_DIR).glob("*.tar"):
            s.read_bytes()  # page cache warm for every contender (nginx reads the same files)
        _epoch_rate(url, work / "cache-probe", batch, lanes)  # start-up costs (imports, first connections)
        # Removed now, while its pages are still dirty: kept, their write-back (the kernel's,
        # about 30 s later) would share the disk with the first rounds.
        shutil.rmtree(work / "cache-probe", ignore_errors=True)
        _epoch_rate(data, None, batch, lanes)
        for r in range(repeat):
            cache = work / f"cache-{r}"
            runs = {
                "local": lambda: _epoch_rate(data, None, batch, lanes),
                "cold": lambda: _epoch_rate(url, cache, batch, lanes),
                "warm": lambda: _epoch_rate(url, cache, batch, lanes),
            }
            order = ["local", "cold", "warm"] if r % 2 == 0 else ["cold", "warm", "local"]
            for name in order:
                rate, to_first = runs[name]()
                rates[name].append(rate)
                first[name].append(to_first)
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        subprocess.run([sys.executable, "-m", "tools.serve", "stop", "--state", str(state)], timeout=60)
    ratios = {k: [v / loc for v, loc in zip(rates[k], rates["local"])] for k in ("cold", "warm")}
    return {"url": url, "batch": batch, "lanes": lanes, "rates": rates, "ratios": ratios,
            "median": {k: statistics.median(v) for k, v in rates.items()},
            "first_batch_s": {k: statistics.median(v) for k, v in first.items()},
            "median_ratio": {k: statistics.median(v) for k, v in ratios.items()}}


def remote_section(data: BenchData, args: argparse.Namespace) -> Section:
    """The loader from local disk, HTTP cold cache and HTTP warm cache, as a bench section."""
    work = data.out.parent / "remote-bench"
    work.mkdir(parents=True, exist_ok=True)
    rounds = max(args.repeat, 5)
    r = remote_bench(data.out, work, repeat=rounds)
    med, ratio, first = r["median"], r["median_ratio"], r["first_batch_s"]

    def spread(k: str) -> str:
        return f"{min(r['ratios'][k]):.2f}-{max(r['ratios'][k]):.2f}"

    sec = Section(
        f"remote: dataset of {data.samples} samples ({data.bytes / 1e6:.0f} MB), train split read by ShardLoader in one process, "
        f"global batch {r['batch']}, {r['lanes']} lanes; nginx on loopback; {rounds} rounds, medians",
        ["loader source", "samples/s", "x local (median of the rounds' ratios)", "range over rounds",
         "first batch, s", "target"],
    )
    sec.rows += [
        ["local disk (page cache warm)", f"{med['local']:.0f}", "1.00", "", f"{first['local']:.2f}", ""],
        ["HTTP, cold cache (fetch + write; read back + hash; reader parses those bytes)", f"{med['cold']:.0f}",
         f"{ratio['cold']:.2f}", spread("cold"), f"{first['cold']:.2f}", ">= 0.5x"],
        ["HTTP, warm cache (each copy read + re-checked, then parsed)", f"{med['warm']:.0f}",
         f"{ratio['warm']:.2f}", spread("warm"), f"{first['warm']:.2f}", ">= 0.9x"],
    ]
    sec.notes.append("first batch: seconds from the epoch's start to its first batch (median over the rounds); "
                     "a lane yields it only once it holds its first shuffle window, so a cold epoch fetches several "
                     "shards per lane before it")
    sec.notes.append("all rounds, samples/s: " + "; ".join(
        f"{k} " + ", ".join(f"{v:.0f}" for v in vals) for k, vals in r["rates"].items()))
    return sec
