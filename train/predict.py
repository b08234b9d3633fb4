"""``python -m train.predict``: predictions of a trained run as an RSNA submission CSV.

``python -m train.predict --data OUT --checkpoint RUN --out submission.csv [--split all]``

Detector runs write the RSNA Pneumonia Detection Challenge format::

    patientId,PredictionString
    0004cfab-14fd-4e49-80ba-63a80b6bddd6,0.8123 264.0 152.0 213.0 379.0 0.5310 562.0 ...

one row per patient, ``conf x y width height`` per box (x, y top-left) in pixels of the
*source* DICOM: each box is mapped from the network's input back through the resize and
the letterbox transform stored with the sample (``shards.geometry.boxes_from_letterbox``)
and clipped to the source image. A patient without boxes gets an empty string. Boxes come
from NMS (the run's IoU threshold) and are kept at or above ``--conf`` (default: the run's
``eval.conf``).

Classifier runs write ``patientId,probability`` (the probability of pneumonia) instead.

A patient with several images (possible in a hospital export, not in RSNA) gets the union
of its boxes, or its highest probability. Prediction runs in one process (a GPU if there is
one); ``--checkpoint`` is the run folder or its ``model.pt``.
"""

from __future__ import annotations

import argparse
import csv
import logging
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shards.atomic import atomic_write
from shards.origin import ShardOrigin, open_origin
from shards.cli import EXIT_USAGE, configure_logging
from shards.format import SPLITS
from shards.store import DatasetNotFoundError, RemoteReadError, read_labels_from, read_manifest_from
from train.checkpoint import load_export
from train.config import EvalConfig, ModelConfig
from train.data import read_split, to_device
from train.distributed import DistEnv, autocast_context
from train.tasks import Task, task_type

__all__ = ["load_model", "load_task", "main", "predict_rows", "write_csv"]

log = logging.getLogger(__name__)
SPLIT_CHOICES = {**{s: (s,) for s in SPLITS}, "all": SPLITS}
"""``--split`` values and the splits each one reads."""


def load_model(export: dict, device: torch.device) -> nn.Module:
    """Rebuild the network of an exported run and load its weights (eval mode)."""
    c = export["classifier"]
    cfg = ModelConfig(task=export["task"], name=export["arch"], width=c["width"], depth=c["depth"],
                      dropout=c["dropout"])
    model, _ = task_type(cfg.task).build_model(cfg)
    model.load_state_dict(export["state_dict"])
    return model.to(device).eval()


def load_task(export: dict, model: nn.Module, *, conf: float | None = None) -> Task:
    """The task of an exported run, with its evaluation thresholds (``conf`` overrides its
    box confidence)."""
    settings = EvalConfig(threshold=float(export["threshold"]),
                          conf=float(export["conf"] if conf is None else conf),
                          iou=float(export["iou"]), max_det=int(export["max_det"]))
    return task_type(export["task"]).create(model, settings, stored_size=int(export["stored_size"]))


@torch.no_grad()
def predict_rows(data: Path | str | ShardOrigin, export: dict, *, split: str = "all", batch_size: int = 32,
                 workers: int = 2, conf: float | None = None, device: torch.device | None = None,
                 amp: str = "none") -> Iterator[tuple[str, Any]]:
    """Yield (patient id, prediction) per sample: a float probability (classify) or a list
    of source-pixel :class:`~train.tasks.SourceBox` (detect). ``data``: a folder, a URL, or a
    :func:`shards.origin.open_origin` source (to read through a cache)."""
    from train.build import eval_loader

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(export, device)
    task = load_task(export, model, conf=conf)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=device, backend=None)
    size = int(export["image_size"])
    source = data if isinstance(data, ShardOrigin) else open_origin(data)
    manifest, labels = read_manifest_from(source.store), read_labels_from(source.store)
    for name in SPLIT_CHOICES[split]:
        info = read_split(source, name, manifest=manifest, labels=labels)
        if not info.samples:
            continue
        loader = eval_loader(info, env, batch_size=batch_size, workers=workers, with_meta=True)
        for batch in loader.epoch(0):
            dev = to_device(batch, device, size)
            with autocast_context(amp, device):
                out = model(dev.images)
            yield from task.submission(out, dev, batch)


def write_csv(path: Path, rows: Iterable[tuple[str, Any]], task: Task | type[Task]) -> int:
    """Merge the rows per patient and write the task's CSV, sorted by patient id (through a
    temporary name); return the number of patients."""
    merged: dict[str, Any] = {}
    for pid, pred in rows:
        merged[pid] = task.merge(merged[pid], pred) if pid in merged else pred
    with atomic_write(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(task.csv_header)
        for pid in sorted(merged):
            w.writerow([pid, task.csv_cell(merged[pid])])
    return len(merged)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m train.predict", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="dataset from `python -m ingest`: a folder or a URL "
                   "(s3://bucket/prefix, http(s)://host/path, file://)")
    p.add_argument("--cache-dir", type=Path, help="node-local folder keeping fetched shards (remote --data)")
    p.add_argument("--cache-limit", type=float, metavar="GB", help="GB of shards --cache-dir keeps")
    p.add_argument("--checkpoint", type=Path, required=True, help="run folder (or its model.pt)")
    p.add_argument("--out", type=Path, required=True, help="CSV to write")
    p.add_argument("--split", choices=tuple(SPLIT_CHOICES), default="all", help="which samples to predict")
    p.add_argument("--conf", type=float, help="detector: lowest box confidence kept (default: the run's)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers")
    p.add_argument("--amp", choices=("bf16", "fp16", "none"), default="none", help="autocast dtype")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(dask=False)
    if args.conf is not None and not 0 <= args.conf <= 1:
        print(f"error: --conf={args.conf}: allowed 0..1", file=sys.stderr)
        return EXIT_USAGE
    try:
        export = load_export(args.checkpoint)
    except (FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        source = open_origin(args.data, cache_dir=args.cache_dir, cache_limit_gb=args.cache_limit)
        read_manifest_from(source.store)  # a wrong path or URL: exit 2 before any work
    except (ValueError, DatasetNotFoundError, RemoteReadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    rows = predict_rows(source, export, split=args.split, batch_size=args.batch_size,
                        workers=args.workers, conf=args.conf, amp=args.amp)
    n = write_csv(args.out, rows, task_type(export["task"]))
    log.info("wrote %d patients to %s (%s)", n, args.out, export["task"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
