"""Section ``remote`` of ``python -m shards.bench``: the training loader from local disk, from
an HTTP server with a cold cache and with a warm one, side by side in one run.

The server is nginx on loopback started by ``python -m shards.serve http`` (the command users
run), serving the bench's dataset folder. Every contender is :class:`train.data.ShardLoader`
in this process (``workers=0``) over the ``train`` split, global batch 32 in 4 lanes, and each
reads every byte it uses through the same sha256 check:

* local: the dataset folder, page cache warm;
* HTTP, cold cache: an empty ``--cache-dir``; shards are fetched (2 ahead of the reader per
  lane, on a helper thread), hashed on arrival and written, and the reader parses the
  downloaded bytes (no second hash);
* HTTP, warm cache: the same cache, as the next run (or epoch) finds it: each copy is read
  and hashed against the manifest before reuse (on the prefetch thread), and the reader
  parses those bytes (no second hash).

Targets: warm >= 0.9x local, cold >= 0.5x local. Needs the ``train`` and ``remote`` extras and
nginx (installed from Debian by ``shards.serve`` when run as root).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from shards.manifest import SHARDS_DIR


def _epoch_rate(location: Any, cache_dir: Path | None, batch: int, lanes: int) -> float:
    from shards.cache import open_source
    from train.data import ShardLoader, read_split

    info = read_split(open_source(location, cache_dir=cache_dir), "train")
    loader = ShardLoader(info, rank=0, world=1, global_batch=batch, lanes=lanes, workers=0)
    t0 = time.perf_counter()
    for _ in loader.epoch(0):
        pass
    return info.samples / (time.perf_counter() - t0)


def remote_bench(data: Path, work: Path, *, repeat: int = 3, batch: int = 32, lanes: int = 4) -> dict[str, Any]:
    """Samples/s of the loader: local, HTTP cold cache, HTTP warm cache (best of ``repeat``)."""
    state = work / "nginx-state"
    done = subprocess.run([sys.executable, "-m", "shards.serve", "http", str(data.parent), "--detach",
                           "--state", str(state), "--json"], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise RuntimeError(f"python -m shards.serve http failed: {done.stderr.strip()}")
    url = json.loads(done.stdout)["url"] + data.name
    rates: dict[str, list[float]] = {"local": [], "cold": [], "warm": []}
    try:
        for s in (data / SHARDS_DIR).glob("*.tar"):
            s.read_bytes()  # page cache warm for every contender (nginx reads the same files)
        _epoch_rate(url, work / "cache-probe", batch, lanes)  # start-up costs (imports, first connections)
        for r in range(repeat):
            rates["local"].append(_epoch_rate(data, None, batch, lanes))
            cache = work / f"cache-{r}"
            rates["cold"].append(_epoch_rate(url, cache, batch, lanes))
            rates["warm"].append(_epoch_rate(url, cache, batch, lanes))
            shutil.rmtree(cache, ignore_errors=True)
    finally:
        subprocess.run([sys.executable, "-m", "shards.serve", "stop", "--state", str(state)], timeout=60)
    best = {k: max(v) for k, v in rates.items()}
    return {"url": url, "batch": batch, "lanes": lanes, "rates": rates, "best": best}


def remote_section(data: Any, args: argparse.Namespace) -> Any:
    """The bench section (``data``: :class:`shards.bench.BenchData`)."""
    from shards.bench import Section

    work = data.out.parent / "remote-bench"
    work.mkdir(parents=True, exist_ok=True)
    r = remote_bench(data.out, work, repeat=args.repeat)
    best, local = r["best"], r["best"]["local"]
    sec = Section(
        f"remote: dataset of {data.samples} samples ({data.bytes / 1e6:.0f} MB), train split read by ShardLoader in one process, "
        f"global batch {r['batch']}, {r['lanes']} lanes; nginx on loopback; best of {args.repeat}",
        ["loader source", "samples/s", "x local", "target"],
    )
    sec.rows += [
        ["local disk (page cache warm)", f"{local:.0f}", "1.00", ""],
        ["HTTP, cold cache (fetch + hash + write; reader parses those bytes)", f"{best['cold']:.0f}", f"{best['cold'] / local:.2f}",
         ">= 0.5x"],
        ["HTTP, warm cache (each copy read + re-checked, then parsed)", f"{best['warm']:.0f}",
         f"{best['warm'] / local:.2f}", ">= 0.9x"],
    ]
    sec.notes.append("all runs, samples/s: " + "; ".join(
        f"{k} " + ", ".join(f"{v:.0f}" for v in vals) for k, vals in r["rates"].items()))
    return sec
