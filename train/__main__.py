"""``python -m train``: stream the shards and train the classifier or the detector.

Launch with ``torchrun --nproc_per_node G -m train ...``, with ``srun`` (one task per GPU;
the SLURM_* variables are mapped by :mod:`train.distributed`) or as a plain single process.
Exit status: 0 done, 1 stopped by a non-finite loss, 2 bad configuration, 3 a checkpoint
that could not be written or a full disk (the last good checkpoint is kept), 130 interrupted
(Ctrl-C).
Either of the last two resumes with the same command and ``--resume``.

A run that seems stuck: ``kill -USR1 <pid>`` (a rank, or one of its loader workers) prints
the stack of every thread of that process to its stderr and lets it go on.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
from pathlib import Path
from typing import Any

from shards.cli import EXIT_USAGE, configure_logging
from shards.diskspace import is_out_of_space
from shards.qa import QA_FLAGS
from train.config import (
    AMP_CHOICES,
    DETECTORS,
    STRATEGIES,
    TASKS,
    TrainConfig,
    load_toml,
    merge,
)

EXIT_NONFINITE = 1
EXIT_CHECKPOINT = 3
EXIT_INTERRUPTED = 130
"""128 + SIGINT, as a shell reports a command ended by Ctrl-C."""

# CLI flag -> (table, field) of the config; table None is the top level.
FLAG_FIELDS: dict[str, tuple[str | None, str]] = {
    "data": ("data", "path"),
    "cache_dir": ("data", "cache_dir"),
    "cache_limit": ("data", "cache_limit"),
    "out": (None, "out"),
    "task": ("model", "task"),
    "model": ("model", "name"),
    "weights": ("model", "weights"),
    "trust_weights": ("model", "trust_weights"),
    "strategy": ("parallel", "strategy"),
    "amp": ("parallel", "amp"),
    "epochs": (None, "epochs"),
    "max_steps": (None, "max_steps"),
    "batch_size": ("data", "batch_size"),
    "eval_batch_size": ("data", "eval_batch_size"),
    "lr": ("optim", "lr"),
    "workers": ("data", "workers"),
    "seed": (None, "seed"),
    "image_size": ("data", "image_size"),
    "log_every": (None, "log_every"),
    "ckpt_every": (None, "ckpt_every"),
    "resume": (None, "resume"),
    "exclude_qa": ("data", "exclude_qa"),
    "exclude_qa_eval": ("data", "exclude_qa_eval"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m train",
        description="Train a pneumonia classifier or a YOLOv8 opacity detector on ingested "
        "shards, under DDP or FSDP2, single process, torchrun or srun. Settings: defaults < "
        "RUN/config.toml (with --resume) < --config FILE < flags.",
    )
    p.add_argument("--data", help="dataset from `python -m ingest`: a folder or a URL "
                   "(s3://bucket/prefix, http(s)://host/path, file://)")
    p.add_argument("--cache-dir", type=Path, help="node-local folder keeping fetched shards of a remote "
                   "dataset (shared by the ranks of a node); default: a temporary one")
    p.add_argument("--cache-limit", type=float, metavar="GB",
                   help="GB of shards --cache-dir keeps (least recently used evicted); default: no limit")
    p.add_argument("--out", type=Path, help="run folder (checkpoints, metrics.jsonl, model.pt)")
    p.add_argument("--config", type=Path, help="TOML file with [data], [model], [optim], ... tables")
    p.add_argument("--task", choices=TASKS, help="classify (CNN) or detect (YOLOv8); default classify")
    p.add_argument("--model", help=f"cnn for classify; {', '.join(DETECTORS)} for detect "
                   "(built from the ultralytics yaml, 1 channel, 1 class; anchor-free)")
    p.add_argument("--weights", type=Path, help="initial weights (state_dict, model.pt, ultralytics .pt)")
    p.add_argument("--trust-weights", action="store_true", default=None,
                   help="allow a full unpickle of --weights (it can run code from the file); "
                   "needed for an ultralytics .pt. Only for files you trust")
    p.add_argument("--strategy", choices=STRATEGIES, help="ddp or fsdp (FSDP2); default ddp")
    p.add_argument("--amp", choices=AMP_CHOICES, help="autocast dtype; default bf16")
    p.add_argument("--epochs", type=int, help="epochs (the LR schedule spans them); default 10")
    p.add_argument("--max-steps", type=int,
                   help="stop after this many steps in all (this invocation only: not taken "
                   "from RUN/config.toml on --resume)")
    p.add_argument("--batch-size", type=int, help="GLOBAL batch size over all ranks; default 32")
    p.add_argument("--eval-batch-size", type=int, help="evaluation batch size per rank; default 32")
    p.add_argument("--lr", type=float, help="peak learning rate (AdamW); default 1e-3")
    p.add_argument("--workers", type=int, help="DataLoader workers per rank; default 0 (reader threads) with 2 CPUs per local rank or fewer, else min(4, CPUs / local ranks)")
    p.add_argument("--seed", type=int, help="seed of weights, sample order, augmentation; default 0")
    p.add_argument("--image-size", type=int, help="train at this side (multiple of 32), resized on the device")
    p.add_argument("--log-every", type=int, help="steps between metrics.jsonl lines; default 10")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints (a restart redoes the "
                   "steps since the last one); default 500")
    p.add_argument("--resume", action="store_true", default=None,
                   help="continue from RUN's latest checkpoint (and RUN/config.toml); with torchrun "
                   "--max-restarts N a run survives N lost ranks")
    p.add_argument("--exclude-qa", metavar="FLAG,...",
                   help=f"leave samples carrying any of these QA flags out of training ({', '.join(QA_FLAGS)}); "
                   "evaluation keeps them and reports its metrics with and without them")
    p.add_argument("--exclude-qa-eval", action="store_true", default=None,
                   help="leave the --exclude-qa samples out of evaluation too")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def resolve_config(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults, RUN/config.toml (on --resume), --config and the flags.

    Raises:
        ValueError: Invalid TOML, unknown keys or values out of range.
    """
    merged: dict[str, Any] = {}
    if args.resume and args.out is not None and (args.out / "config.toml").is_file():
        merged = load_toml(args.out / "config.toml")
        # Where to stop belongs to an invocation, not to the run: a run stopped with
        # --max-steps resumes to its end unless --max-steps is given again.
        merged.pop("max_steps", None)
    if args.config is not None:
        merged = merge(merged, load_toml(args.config))
    flags: dict[str, Any] = {}
    for flag, (table, field) in FLAG_FIELDS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        value = str(value) if isinstance(value, Path) else value
        if table is None:
            flags[field] = value
        else:
            flags.setdefault(table, {})[field] = value
    model_flags = flags.get("model", {})
    if "task" in model_flags and "name" not in model_flags \
            and merged.get("model", {}).get("task") != model_flags["task"]:
        merged.get("model", {}).pop("name", None)  # a new task picks its own default model
    merged = merge(merged, flags)
    merged["resume"] = bool(args.resume)
    cfg = TrainConfig.from_dict(merged)
    cfg.check_complete()
    return cfg


def interrupted(out: Path | None) -> str:
    """The one line of a run stopped by Ctrl-C: where ``--resume`` takes it up."""
    from train.checkpoint import latest_checkpoint

    try:
        latest = latest_checkpoint(out) if out is not None else None
    except (OSError, ValueError):
        latest = None
    if latest is None:
        return "interrupted before the first checkpoint; run the same command again to start over"
    return f"interrupted; run the same command with --resume to continue from {latest.name}"


def main(argv: list[str] | None = None) -> int:
    """Parse, configure logging, build the run, train; always leave the process group."""
    args = build_parser().parse_args(argv)
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # see the module docstring
    from train.distributed import RestartUnsafeError, destroy, detect_launch, init_distributed

    try:
        cfg = resolve_config(args)
        rank = detect_launch().rank
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    configure_logging(args.verbose, rank=rank, dask=False)  # rank 0 at INFO, the others WARNING
    log = logging.getLogger("train")
    from train.build import build_run
    from train.checkpoint import CheckpointWriteError
    from train.loop import train
    from train.state import NonFiniteLossError

    try:
        try:
            run = build_run(cfg, init_distributed())
        except (ValueError, FileNotFoundError, RestartUnsafeError) as exc:
            log.error("%s", exc)
            return EXIT_USAGE
        train(run)
    except NonFiniteLossError as exc:
        log.error("%s", exc)
        return EXIT_NONFINITE
    except CheckpointWriteError as exc:  # every rank meets it; one line says it
        if rank == 0:
            log.error("%s", exc)
        return EXIT_CHECKPOINT
    except KeyboardInterrupt:
        if rank == 0:
            log.error("%s", interrupted(cfg.out))
        return EXIT_INTERRUPTED
    except OSError as exc:  # metrics or eval.json on a full disk: the checkpoints are as safe
        if not is_out_of_space(exc):
            raise
        log.error("%s (%s); free space, then run the same command with --resume", exc.strerror, exc.filename)
        return EXIT_CHECKPOINT
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
