"""Putting a training run together: :func:`build_run` reads the dataset, builds the
loaders, the model, the optimizer and the schedule, and restores a checkpoint with
``--resume``; :func:`build_model` and :func:`eval_loader` serve the other entry points too.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shards.manifest import manifest_sha256
from shards.origin import open_origin
from shards.qa import qa_mask
from shards.store import DatasetNotFoundError, RemoteReadError, read_labels_from, read_manifest_from, redact_url
from shards.versions import split_version
from train.checkpoint import latest_checkpoint, load_checkpoint
from train.config import ModelConfig, TrainConfig, dump_toml
from train.data import ShardLoader, read_split
from train.distributed import DistEnv, make_grad_scaler, parallelize
from train.state import CONFIG_NAME, METRICS_NAME, LossGuard, MetricsWriter, Run
from train.tasks import task_type

__all__ = ["build_model", "build_optimizer", "build_run", "eval_loader", "lr_factor", "resume"]

log = logging.getLogger(__name__)


def build_model(task: str, arch: str, *, width: int = 32, depth: int = 4, dropout: float = 0.2,
                prior: float | None = None, weights: Path | None = None,
                trust_weights: bool = False) -> tuple[nn.Module, list[nn.Module]]:
    """The unwrapped network and its main blocks (the FSDP2 units), built by its task.

    Args:
        task: ``classify`` or ``detect``.
        arch: ``cnn`` or a YOLOv8 name.
        width, depth, dropout: Classifier shape.
        prior: Classifier: initial positive probability (the train positive rate).
        weights: Initial weights: a state_dict file, or a dict holding one under
            ``state_dict`` (this project's ``model.pt``); ultralytics checkpoints too for
            the detector.
        trust_weights: Allow a full unpickle of ``weights`` (see
            :func:`train.models.read_weights`); an ultralytics ``.pt`` needs it.

    Raises:
        ValueError: Unknown task or architecture; ``weights`` pickles objects and
            ``trust_weights`` is False, or does not fit the model.
        FileNotFoundError: ``weights`` does not exist.
    """
    cfg = ModelConfig(task=task, name=arch, width=width, depth=depth, dropout=dropout,
                      weights=weights, trust_weights=trust_weights)
    return task_type(task).build_model(cfg, prior=prior)


def build_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and normalisation weights (1-D parameters)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.optim.weight_decay},
              {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=cfg.optim.betas)


def lr_factor(step: int, *, total: int, warmup: float, schedule: str, min_ratio: float) -> float:
    """Learning-rate multiplier after ``step`` optimizer steps (linear warm-up, cosine)."""
    warm = round(warmup * total)
    if step < warm:
        return 0.01 + 0.99 * step / warm
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warm) / max(1, total - warm))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_run(cfg: TrainConfig, env: DistEnv) -> Run:
    """Read the dataset, build loaders, model, optimizer and schedule; resume if asked.

    Raises:
        ValueError: A configuration that does not fit the dataset or the world size.
    """
    cfg.check_complete()
    assert cfg.data.path is not None and cfg.out is not None
    try:  # a wrong path or URL is a usage error (exit 2) with its one-line reason
        source = open_origin(cfg.data.path, cache_dir=cfg.data.cache_dir, cache_limit_gb=cfg.data.cache_limit)
        manifest = read_manifest_from(source.store)
        labels = read_labels_from(source.store)
    except (DatasetNotFoundError, RemoteReadError) as exc:
        raise ValueError(f"{exc} (run `python -m ingest --out DATASET ...` first, or check --data)") from exc
    cfg.data.version, cfg.data.manifest_sha256 = manifest.version, manifest_sha256(manifest)
    world = env.world_size
    if cfg.data.batch_size % world or cfg.data.num_lanes % world:
        raise ValueError(f"the world size {world} must divide data.batch_size="
                         f"{cfg.data.batch_size} and the {cfg.data.num_lanes} lanes")
    drop = qa_mask(cfg.data.exclude_qa)
    train_info = read_split(source, "train", manifest=manifest, labels=labels, exclude_qa=drop)
    if drop and not train_info.samples:
        raise ValueError(f"--exclude-qa {','.join(cfg.data.exclude_qa)} leaves no training sample "
                         f"(all {train_info.excluded} carry one of those flags)")
    targets = train_info.split_targets()
    kind = task_type(cfg.model.task)
    if kind.needs_labels and (targets < 0).any():
        raise ValueError(f"the train split has {(targets < 0).sum()} unlabelled samples; "
                         f"{kind.name} training needs labels")
    if not (targets >= 0).any():
        raise ValueError("the train split has no labelled samples")
    pin = env.device.type == "cuda"
    train_loader = ShardLoader(
        train_info, rank=env.rank, world=world, global_batch=cfg.data.batch_size,
        lanes=cfg.data.num_lanes, workers=cfg.data.num_workers, seed=cfg.seed, train=True,
        window=cfg.data.shuffle_window, prefetch=cfg.data.prefetch, pin_memory=pin,
        threads=cfg.data.threads,
    )
    val_loader = None
    val_info = read_split(source, "val", manifest=manifest, labels=labels,
                          exclude_qa=drop if cfg.data.exclude_qa_eval else 0)
    if val_info.samples:
        val_loader = eval_loader(val_info, env, batch_size=cfg.data.eval_batch_size,
                                 workers=cfg.data.num_workers, prefetch=cfg.data.prefetch,
                                 threads=cfg.data.threads)
    else:
        log.warning("no val split in %s: no evaluation", source.display)

    stored = manifest.size
    image_size = cfg.data.image_size or stored
    positive = float((targets == 1).sum() / max(1, (targets >= 0).sum()))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (FSDP2 needs it)
    model, blocks = kind.build_model(cfg.model, prior=min(max(positive, 0.01), 0.99))
    task = kind.create(model, cfg.eval, stored_size=stored)
    model = parallelize(model, env, strategy=cfg.parallel.strategy, blocks=blocks, amp=cfg.parallel.amp)
    optimizer = build_optimizer(model, cfg)
    total = cfg.epochs * train_loader.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, total=total, warmup=cfg.optim.warmup, schedule=cfg.optim.schedule,
        min_ratio=cfg.optim.min_lr_ratio))
    scaler = make_grad_scaler(cfg.parallel.amp, env.device, sharded=cfg.parallel.strategy == "fsdp")
    if env.is_main:
        cfg.out.mkdir(parents=True, exist_ok=True)
    run = Run(
        cfg=cfg, env=env, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        task=task, train_loader=train_loader, val_loader=val_loader, image_size=image_size,
        stored_size=stored, writer=MetricsWriter(cfg.out / METRICS_NAME, env.is_main),
        guard=LossGuard(task.terms),
    )
    log.info("dataset %s: %d train samples (%.1f%% positive) in %d shards, %d val; "
                "images %d px stored, %d px trained", source.display, train_info.samples,
                100 * positive, len(train_info.shards), val_info.samples, stored, image_size)
    if drop:
        log.info("--exclude-qa %s: %d train samples left out%s", ",".join(cfg.data.exclude_qa),
                 train_info.excluded, f", {val_info.excluded} val" if cfg.data.exclude_qa_eval else
                 "; evaluation keeps them and reports its metrics without them as well")
    if cfg.resume:
        resume(run)
    if env.is_main:  # after resume(): a refused resume leaves the run's config as it was
        (cfg.out / CONFIG_NAME).write_text(dump_toml(cfg), encoding="utf-8")
    return run


def _check_same_version(path: Path, state: dict[str, Any], mine: dict[str, Any], data: Any) -> None:
    """Refuse to resume a checkpoint on another dataset version than it trained on (a
    checkpoint from before versions were recorded names none, and is let through)."""
    was, now = state.get("manifest_sha256"), mine["manifest_sha256"]
    if was is None or was == now:
        return
    base = redact_url(split_version(str(data))[0])
    raise ValueError(f"cannot resume {path}: it trained on {base}@v{state.get('data_version')} "
                     f"(manifest sha256 {str(was)[:12]}...), --data now gives {base}@v{mine['data_version']} "
                     f"({now[:12]}...); pass --data {base}@v{state.get('data_version')}")


def eval_loader(info: Any, env: DistEnv, *, batch_size: int, workers: int, prefetch: int = 2,
                with_meta: bool = False, threads: int | None = None) -> ShardLoader:
    """A loader that gives every sample of a split once over all ranks (padding masked).

    Each rank gets ``batch_size`` samples per batch, split into as many lanes as the
    largest divisor of ``batch_size`` not above ``workers`` (one DataLoader worker each).
    """
    per_rank = max(d for d in range(1, max(workers, 1) + 1) if batch_size % d == 0)
    return ShardLoader(
        info, rank=env.rank, world=env.world_size, global_batch=batch_size * env.world_size,
        lanes=per_rank * env.world_size, workers=workers, train=False, prefetch=prefetch,
        with_meta=with_meta, pin_memory=env.device.type == "cuda", threads=threads,
    )


def resume(run: Run) -> None:
    """Restore the latest checkpoint of ``run.out`` (a fresh start if there is none)."""
    path = latest_checkpoint(run.out)
    if path is None:
        log.warning("--resume: no checkpoint in %s; starting from scratch", run.out)
        return
    state = load_checkpoint(path, model=run.model, optimizer=run.optimizer,
                            scheduler=run.scheduler, scaler=run.scaler)
    mine = run.train_state()
    _check_same_version(path, state, mine, run.cfg.data.path)  # first: another version changes the rest too
    before, now = list(state.get("exclude_qa") or []), mine["exclude_qa"]
    if before != now:
        raise ValueError(f"cannot resume {path}: it excluded QA flags [{', '.join(before)}], this run "
                         f"[{', '.join(now)}] (the training plan would change; resume with --exclude-qa "
                         f"'{','.join(before)}')")
    for key in ("global_batch", "lanes", "seed", "steps_per_epoch"):
        if state.get(key) != mine[key]:
            raise ValueError(f"cannot resume {path}: {key} was {state.get(key)}, now {mine[key]} "
                             "(the sample order would change; keep the global batch, lanes and seed)")
    run.step = int(state["step"])
    if state.get("world_size") != run.env.world_size:
        log.info("resuming a %s-rank checkpoint on %d ranks", state.get("world_size"), run.env.world_size)
