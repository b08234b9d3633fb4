"""``python -m ingest.slurm_bench``: ingest throughput through Slurm worker jobs against the
LocalCluster, on the same synthetic set, and the start-up cost of getting workers.

For each K in ``--workers`` (default 1 and 2) it measures, best of ``--repeat`` runs:

* start-up: from starting the cluster to the first and to all K workers connected
  (LocalCluster with K processes; SLURMCluster with K one-core jobs: submit, schedule,
  start python, import distributed, connect);
* the whole ingest (``run_ingest``): wall time including start-up, planning, labels and
  manifest, and the span from the first shard started to the last one finished (the
  throughput once workers are there);
* that both clusters wrote the same bytes (the manifest's per-shard sha256).

Cluster settings come from the dask config as for ``python -m ingest --cluster slurm``
(``jobqueue.slurm``: queue, interface, ...); where it leaves cores/memory unset, each job
gets 1 core and 2 GB. ``--queue`` overrides the partition.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from ingest.cluster import open_client
from ingest.config import IngestConfig
from ingest.pipeline import run_ingest
from ingest.synth import SynthSummary, make_dataset
from shards.cli import configure_logging
from shards.manifest import read_manifest


def _cfg(kind: str, workers: int, synth: SynthSummary, out: Path, shard_size: int, queue: str | None) -> IngestConfig:
    return synth.ingest_config(
        out, cluster=kind, workers=workers if kind == "local" else None, jobs=workers, queue=queue,
        shard_size=shard_size, worker_timeout=300,
    )


def startup(cfg: IngestConfig) -> dict[str, float]:
    """Seconds from starting the cluster to the first and to all workers connected."""
    n = cfg.jobs if cfg.cluster == "slurm" else (cfg.workers or 1)
    t0 = time.perf_counter()
    with open_client(cfg) as client:
        first = time.perf_counter() - t0  # open_client returns once one worker is there (Slurm)
        client.wait_for_workers(n, timeout=cfg.worker_timeout)
        every = time.perf_counter() - t0
    return {"first": first, "all": every}


def ingest_once(cfg: IngestConfig) -> dict[str, Any]:
    """One whole ingest into a fresh folder: wall, span (first shard start to last end), shard hashes."""
    shutil.rmtree(cfg.out, ignore_errors=True)
    t0 = time.perf_counter()
    summary = run_ingest(cfg)
    wall = time.perf_counter() - t0
    recs = summary.records
    manifest = read_manifest(cfg.out)
    return {
        "wall": wall,
        "span": max(r.stats.finished for r in recs) - min(r.stats.started for r in recs),
        "busy": sum(r.stats.seconds for r in recs),
        "samples": summary.counts["samples"],
        "hashes": [s.sha256 for s in manifest.shards],
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m ingest.slurm_bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--n", type=int, default=128, help="synthetic images")
    p.add_argument("--size", type=int, default=1024, help="side of the synthetic images (RSNA: 1024)")
    p.add_argument("--shard-size", type=int, default=16, help="samples per shard (tasks = n / shard size)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2], help="worker counts K to compare")
    p.add_argument("--repeat", type=int, default=2, help="runs of each; the best is reported")
    p.add_argument("--queue", help="Slurm partition (overrides jobqueue.slurm.queue)")
    p.add_argument("--workdir", type=Path, help="keep data here; worker jobs on other nodes must see it "
                   "(default: a temporary folder under the current one, removed at the end)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(level=logging.WARNING)
    for noisy in ("distributed", "dask_jobqueue", "ingest"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("PNEUMO_DASHBOARD", ":0")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ingest-slurm-bench-", dir=Path.cwd()))
    synth = make_dataset(work / "synth", args.n, seed=0, size=args.size, progress=False)
    for f in synth.images_dir.glob("*.dcm"):  # warm the page cache for every contender alike
        f.read_bytes()

    results: dict[tuple[str, int], dict[str, Any]] = {}
    for k in args.workers:
        for kind in ("local", "slurm"):
            cfg = _cfg(kind, k, synth, work / f"out-{kind}-{k}", args.shard_size, args.queue)
            ups = [startup(cfg) for _ in range(args.repeat)]
            runs = [ingest_once(cfg) for _ in range(args.repeat)]
            best = min(runs, key=lambda r: r["wall"])
            results[(kind, k)] = {
                **best,
                "first": statistics.median(u["first"] for u in ups),
                "all": statistics.median(u["all"] for u in ups),
                "span": min(r["span"] for r in runs),
            }
    reference = results[("local", args.workers[0])]["hashes"]
    identical = all(r["hashes"] == reference for r in results.values())

    cores = os.cpu_count() or 1
    print(f"ingest through Slurm: {args.n} synthetic {args.size}x{args.size} JPEG Baseline DICOMs -> 640 px, "
          f"shard size {args.shard_size} ({-(-args.n // args.shard_size)} tasks), {cores} cores on this machine, "
          f"best of {args.repeat}\n")
    print("| cluster | K | first worker s | all K workers s | ingest wall s | images/s (wall) | "
          "images/s (span) | slurm / local (wall) | slurm / local (span) | worker ms/image |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (kind, k), r in sorted(results.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        local = results[("local", k)]
        wall_rate, span_rate = r["samples"] / r["wall"], r["samples"] / r["span"]
        ratio_wall = wall_rate / (local["samples"] / local["wall"])
        ratio_span = span_rate / (local["samples"] / local["span"])
        name = "SLURMCluster (K jobs)" if kind == "slurm" else "LocalCluster (K processes)"
        print(f"| {name} | {k} | {r['first']:.1f} | {r['all']:.1f} | {r['wall']:.1f} | {wall_rate:.1f} | "
              f"{span_rate:.1f} | {ratio_wall:.2f} | {ratio_span:.2f} | {1000 * r['busy'] / r['samples']:.1f} |")
    print()
    print("worker ms/image: busy time per image inside the shard tasks; well above the 1-worker value means the")
    print("cores were shared with something else during that run (rerun on a quiet machine).")
    print(f"same shard bytes on every cluster: {'yes' if identical else 'NO'}")
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if identical else 1


if __name__ == "__main__":
    raise SystemExit(main())
