"""``python -m train.bench``: training throughput and memory, DDP vs FSDP2, AMP on and off.

For each model (the CNN classifier, the YOLOv8n detector) x strategy (ddp, fsdp) x amp,
``--world`` ranks are spawned (gloo on CPU, NCCL on GPUs) and train on synthetic batches
already on the device (no loader: this measures the model and the parallelism), at
``--size`` pixels. Per configuration:

* images/s over all ranks (mean of ``--steps`` timed steps after 2 warm-up steps);
* peak memory per rank at the per-rank batch ``--batch``: CUDA allocated on a GPU, the
  process's peak resident set on the CPU;
* the largest per-rank batch that fits, *estimated* from the peak memory at two batch
  sizes (a linear fit, memory = base + per-sample x batch) against the device memory (GPU)
  or the free RAM shared by the ranks (CPU). Marked "est.": no batch is run to failure.

:func:`loader_bench` compares the streaming shard loader with an on-the-fly DICOM dataset,
both per process, on ``--loader-n`` synthetic 1024 px DICOMs ingested at 640 px; ``--loader``
runs it too, ``--loader-only`` runs it alone (``--repeat`` times on the same data, the best
reported).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import shutil
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from shards.cli import configure_logging

__all__ = ["loader_bench", "main", "model_bench"]

log = logging.getLogger(__name__)

WARMUP_STEPS = 2


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _bench_worker(rank: int, world: int, port: int, spec: dict[str, Any], out: str) -> None:
    """One rank of one configuration: train on synthetic batches, write results (rank 0)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    configure_logging(level=logging.WARNING, dask=False)
    # The detector's outputs are views; nothing here modifies them in place.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    from train.config import EvalConfig, TrainConfig
    from train.data import DeviceBatch
    from train.distributed import (
        autocast_context,
        destroy,
        init_distributed,
        make_grad_scaler,
        parallelize,
    )
    from train.build import build_model, build_optimizer
    from train.tasks import task_type

    env = init_distributed(timeout_s=600)
    try:
        torch.manual_seed(0)
        task_name, arch, size = spec["task"], spec["arch"], spec["size"]
        model, blocks = build_model(task_name, arch)
        task = task_type(task_name).create(model, EvalConfig(), stored_size=size)
        model = parallelize(model, env, strategy=spec["strategy"], blocks=blocks, amp=spec["amp"])
        optimizer = build_optimizer(model, TrainConfig())
        scaler = make_grad_scaler(spec["amp"], env.device, sharded=spec["strategy"] == "fsdp")
        cuda = env.device.type == "cuda"

        def step(batch: DeviceBatch) -> None:
            with autocast_context(spec["amp"], env.device):
                out = model(batch.images)
            loss, _ = task.loss(model, out, batch)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()

        results = []
        for per_rank in (spec["batch_small"], spec["batch"]):
            g = torch.Generator().manual_seed(rank)
            n = per_rank
            boxes = torch.tensor([[size * 0.2, size * 0.2, size * 0.5, size * 0.6]]).repeat(n, 1)
            batch = DeviceBatch(
                images=torch.rand(n, 1, size, size, generator=g).to(env.device),
                target=(torch.arange(n) % 2).to(env.device), boxes=boxes.to(env.device),
                box_index=torch.arange(n).to(env.device),
                valid=torch.ones(n, dtype=torch.bool, device=env.device), size=size,
            )
            if cuda:
                torch.cuda.reset_peak_memory_stats(env.device)
            for _ in range(WARMUP_STEPS):
                step(batch)
            if cuda:
                torch.cuda.synchronize(env.device)
            t0 = time.perf_counter()
            for _ in range(spec["steps"]):
                step(batch)
            if cuda:
                torch.cuda.synchronize(env.device)
            seconds = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(env.device) / 2**20 if cuda else _rss_mb()
            results.append({"batch": per_rank, "images_per_s": per_rank * world * spec["steps"] / seconds,
                            "peak_mb": peak})
        if cuda:
            budget = torch.cuda.get_device_properties(env.device).total_memory / 2**20 * 0.9
        else:
            with open("/proc/meminfo") as f:
                avail = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
            budget = _current_rss_mb() + avail / 1024 / world
        (s, big) = results
        slope = (big["peak_mb"] - s["peak_mb"]) / max(1, big["batch"] - s["batch"])
        base = big["peak_mb"] - slope * big["batch"]
        largest = int((budget - base) / slope) if slope > 0 else None
        if env.rank == 0:
            Path(out).write_text(json.dumps({**spec, "images_per_s": big["images_per_s"],
                                             "peak_mb": big["peak_mb"], "per_sample_mb": slope,
                                             "largest_batch_est": largest,
                                             "device": str(env.device)}))
    finally:
        destroy()


def model_bench(*, task: str, arch: str, strategy: str, amp: str, size: int, batch: int,
                steps: int, world: int) -> dict[str, Any]:
    """Run one configuration on ``world`` spawned ranks; return rank 0's measurements."""
    import torch.multiprocessing as mp

    from tools.serve import free_port

    spec = {"task": task, "arch": arch, "strategy": strategy, "amp": amp, "size": size,
            "batch": batch, "batch_small": max(1, batch // 2), "steps": steps}
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "result.json")
        mp.start_processes(_bench_worker, args=(world, free_port(), spec, out), nprocs=world,
                           start_method="spawn")
        return json.loads(Path(out).read_text())


# --------------------------------------------------------------------------- loader


def _make_dataset(work: Path, n: int, src_size: int, size: int, shard_size: int) -> Path:
    """``n`` synthetic DICOMs ingested into one split (``train``): the loader's data."""
    from ingest.synth import make_ingested

    return make_ingested(work, n, seed=0, src_size=src_size, size=size, shard_size=shard_size,
                         val_fraction=0.0, workers=min(4, os.cpu_count() or 1)).out


def loader_bench(data: Path | str | None = None, *, n: int = 512, src_size: int = 1024,
                 size: int = 640, shard_size: int = 64, batch: int = 32, lanes: int = 2,
                 dicom_items: int = 64, workdir: Path | str | None = None) -> dict[str, Any]:
    """Samples/s per process: the shard loader vs an on-the-fly DICOM dataset, same run.

    (a) shards: :class:`train.data.ShardLoader` in this process (``workers=0``) over the
        ``train`` split: tar parse + xxh3 of every sample + JSON + key check against
        labels.zarr + batch assembly, uint8 batches out (page cache warm).
    (b) DICOM: a map-style ``torch.utils.data.Dataset`` whose ``__getitem__`` reads one
        DICOM and runs ``ingest.worker.process_sample`` (decode + CLAHE + letterbox), batched
        by a ``DataLoader`` with ``num_workers=0``, over the first ``dicom_items`` samples.

    Args:
        data: An ingested dataset whose source DICOM folder (``manifest.source.dicom_dir``)
            still exists; None makes ``n`` synthetic ``src_size`` DICOMs and ingests them at
            ``size`` into ``shard_size``-sample shards (all in ``train``).
        batch, lanes: The shard loader's batch and lanes (``lanes`` divides ``batch``).
        dicom_items: Samples read through the DICOM dataset (it is slow).
        workdir: Where to make the data (default: a temporary folder, removed after).

    Returns:
        ``shard_samples_per_s``, ``dicom_samples_per_s``, ``speedup``, sample counts and
        image size; targets: >= 2000 samples/s per process and >= 20x.
    """
    import numpy as np
    from torch.utils.data import DataLoader, Dataset

    from ingest.config import PROCESSING_FIELDS
    from ingest.plan import PlannedSample
    from ingest.worker import process_sample
    from shards.manifest import SHARDS_DIR, read_manifest
    from shards.reader import iter_samples
    from train.data import ShardLoader, read_split

    tmp = None
    if data is None:
        tmp = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="loader-bench-"))
        data = _make_dataset(tmp, n, src_size, size, shard_size)
    data = Path(data)
    try:
        manifest = read_manifest(data)
        info = read_split(data, "train", manifest=manifest)
        for s in info.shards:  # warm the page cache, as the DICOM side gets below
            (data / SHARDS_DIR / s.name).read_bytes()
        loader = ShardLoader(info, rank=0, world=1, global_batch=batch, lanes=lanes, workers=0)
        t0 = time.perf_counter()
        seen = sum(int(b.valid.sum()) for b in loader.epoch(0))
        shard_rate = info.samples / (time.perf_counter() - t0)

        dicom_dir = Path(manifest.source["dicom_dir"])
        metas = []
        for s in info.shards:
            for sample in iter_samples(data / SHARDS_DIR / s.name, decode=False):
                metas.append(sample.meta)
                if len(metas) == dicom_items:
                    break
            if len(metas) == dicom_items:
                break
        processing = {k: v for k, v in manifest.params.items() if k in PROCESSING_FIELDS}

        class DicomDataset(Dataset):
            """Read + decode + CLAHE + letterbox per item: training without an ingest."""

            def __len__(self) -> int:
                return len(metas)

            def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
                m = metas[i]
                planned = PlannedSample(key=m["key"], patient_id=m["patient_id"],
                                        path=m["source"]["path"], split=m["split"],
                                        target=m["target"], class_name=m["class"], boxes=())
                done = process_sample((dicom_dir / planned.path).read_bytes(), planned, processing)
                return torch.from_numpy(np.ascontiguousarray(done.image)), int(m["target"])

        for m in metas:
            (dicom_dir / m["source"]["path"]).read_bytes()
        t0 = time.perf_counter()
        got = sum(len(x) for x, _ in DataLoader(DicomDataset(), batch_size=batch, num_workers=0))
        dicom_rate = got / (time.perf_counter() - t0)
        return {
            "shard_samples_per_s": shard_rate, "dicom_samples_per_s": dicom_rate,
            "speedup": shard_rate / dicom_rate, "shard_samples": seen,
            "dicom_samples": got, "size": manifest.size, "shards": len(info.shards),
            "batch": batch, "lanes": lanes,
        }
    finally:
        if tmp is not None and workdir is None:
            shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------- main


def _table(rows: list[dict[str, Any]]) -> str:
    head = "| model | strategy | amp | images/s | peak MB/rank | MB/sample | largest batch/rank (est.) |"
    lines = [head, "|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        largest = "-" if r["largest_batch_est"] is None else f"~{r['largest_batch_est']}"
        lines.append(f"| {r['arch']} | {r['strategy']} | {r['amp']} | {r['images_per_s']:.1f} "
                     f"| {r['peak_mb']:.0f} | {r['per_sample_mb']:.1f} | {largest} |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.bench", description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=128, help="image side")
    p.add_argument("--batch", type=int, default=8, help="per-rank batch (the fit also runs half of it)")
    p.add_argument("--steps", type=int, default=4, help="timed steps per configuration")
    p.add_argument("--world", type=int, default=None,
                   help="ranks: default one per visible GPU, or 2 CPU processes without CUDA")
    p.add_argument("--models", default="cnn,yolov8n", help="comma list: cnn and/or yolov8n/s/m")
    p.add_argument("--strategies", default="ddp,fsdp", help="comma list: ddp and/or fsdp")
    p.add_argument("--amps", default=None, help="default: none,bf16 on CPU; none,bf16,fp16 on GPU")
    p.add_argument("--loader", action="store_true", help="also run loader_bench (synthetic 640 px data)")
    p.add_argument("--loader-only", action="store_true", help="run loader_bench alone")
    p.add_argument("--loader-n", type=int, default=512, help="synthetic DICOMs the loader bench ingests")
    p.add_argument("--repeat", type=int, default=3, help="loader bench runs on the same data; the best is reported")
    p.add_argument("--peer-n", type=int, default=2700,
                   help="samples the loader bench reads with ours and the peers (webdataset, Streaming, LitData)")
    p.add_argument("--rounds", type=int, default=3, help="rounds of the peers comparison (medians printed)")
    p.add_argument("--no-peers", action="store_true",
                   help="leave out Streaming and LitData (their environment is made on first use)")
    p.add_argument("--no-dicom", action="store_true", help="leave out the DICOM-dataset comparison")
    p.add_argument("--workdir", type=Path, default=None,
                   help="keep the peers comparison's data here and reuse it (default: a temporary folder)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(level=logging.WARNING, dask=False)
    if args.loader_only:
        print(_peers_table(args.peer_n, args.rounds, peers=not args.no_peers, workdir=args.workdir))
        if not args.no_dicom:
            print("\n" + _loader_table(args.loader_n, args.repeat))
        return 0
    amps = (args.amps or ("none,bf16,fp16" if torch.cuda.is_available() else "none,bf16")).split(",")
    cuda = torch.cuda.is_available()
    world = args.world or (torch.cuda.device_count() if cuda else 2)
    strategies = args.strategies.split(",")
    where = f"{torch.cuda.get_device_name()} x{world}" if cuda else \
        f"CPU, {os.cpu_count()} cores, {world} gloo ranks"
    if world == 1:
        # No process group with one rank: parallelize() wraps nothing, every strategy is
        # the same run (and one GPU cannot hold two NCCL ranks).
        strategies = strategies[:1]
        where += " (one rank: the model is not wrapped in DDP or FSDP)"
    print(f"train bench: {args.size}x{args.size} synthetic batches, per-rank batch {args.batch}, "
          f"{args.steps} timed steps, {where}\n")
    rows = []
    for arch in args.models.split(","):
        task = "classify" if arch == "cnn" else "detect"
        for strategy in strategies:
            for amp in amps:
                rows.append(model_bench(task=task, arch=arch, strategy=strategy, amp=amp,
                                        size=args.size, batch=args.batch, steps=args.steps,
                                        world=world))
    print(_table(rows))
    if args.loader:
        print("\n" + _loader_table(args.loader_n, args.repeat))
    return 0


def _peers_table(n: int, rounds: int, *, peers: bool, workdir: Path | None) -> str:
    """:func:`train.peer_bench.peer_bench` in ``workdir`` (kept) or a temporary folder, as markdown."""
    from train.peer_bench import peer_bench, table

    if workdir is not None:
        workdir.mkdir(parents=True, exist_ok=True)
        return table(peer_bench(workdir, n=n, rounds=rounds, peers=peers))
    with tempfile.TemporaryDirectory(prefix="peer-bench-") as tmp:
        return table(peer_bench(Path(tmp), n=n, rounds=rounds, peers=peers))


def _loader_table(n: int, repeat: int) -> str:
    """Run :func:`loader_bench` ``repeat`` times on one synthetic dataset; the best as markdown."""
    with tempfile.TemporaryDirectory(prefix="loader-bench-") as tmp:
        data = _make_dataset(Path(tmp), n, src_size=1024, size=640, shard_size=64)
        r = max((loader_bench(data) for _ in range(repeat)), key=lambda r: r["shard_samples_per_s"])
    return "\n".join([
        f"loader bench: {r['shard_samples']} train samples of {r['size']}x{r['size']} in {r['shards']} shards, "
        f"global batch {r['batch']}, {r['lanes']} lanes; one process each, page cache warm, best of {repeat}",
        "",
        "| loader | samples/s per process | target |",
        "|---|---:|---:|",
        f"| (a) shards: ShardLoader (tar parse + xxh3 of every sample + JSON + batch) "
        f"| {r['shard_samples_per_s']:.0f} | >= 2000 |",
        f"| (b) DICOM Dataset: read + decode + CLAHE + letterbox per item | {r['dicom_samples_per_s']:.0f} | |",
        f"| (a) / (b) | {r['speedup']:.1f}x | >= 20x |",
    ])


if __name__ == "__main__":
    raise SystemExit(main())
