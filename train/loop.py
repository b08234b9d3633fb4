"""The training loop: :func:`build_run` puts a run together, :func:`train` runs it,
:func:`train_step` is one optimizer step and :func:`evaluate` one pass over ``val``.

Both tasks share the loop; what differs (loss, what a prediction is, which metrics) is in
a small :class:`Task` object. Checkpointing, evaluation and metric writing are named calls
from :func:`train`.

Outputs in the run folder: ``metrics.jsonl`` (one line per logging step: losses, learning
rate, images/s, the fraction of step time spent waiting for data, peak memory; one per
evaluation), ``eval.json`` (the latest evaluation), ``config.toml``, ``checkpoints/`` and,
at the end, ``model.pt``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from shards.labels import read_labels
from shards.manifest import LABELS_NAME, MANIFEST_NAME, read_manifest
from train import metrics as M
from train.augment import augment, step_params
from train.checkpoint import (
    EXPORT_NAME,
    export_model,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from train.config import TrainConfig, dump_toml
from train.data import DeviceBatch, HostBatch, ShardLoader, read_split, to_device
from train.distributed import (
    DistEnv,
    all_gather_object,
    all_reduce_sum,
    autocast_context,
    broadcast_buffers,
    make_grad_scaler,
    parallelize,
)
from train.models import (
    ClassifierConfig,
    DetectionLoss,
    PneumoniaCNN,
    build_detector,
    detector_blocks,
    postprocess_detections,
)

__all__ = [
    "ClassifyTask",
    "DetectTask",
    "NonFiniteLossError",
    "Run",
    "build_model",
    "build_run",
    "evaluate",
    "train",
    "train_step",
]

logger = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
EVAL_NAME = "eval.json"
CONFIG_NAME = "config.toml"
RSNA_CONF_GRID = tuple(round(c, 2) for c in np.arange(0.05, 0.96, 0.05))
"""Confidence thresholds tried for the best RSNA score on val."""
MAP_CONF = 0.001
"""Lowest confidence kept for mAP@0.5 (the usual COCO-style setting)."""


class NonFiniteLossError(RuntimeError):
    """The loss became nan or inf; the run stops."""

    def __init__(self, step: int, terms: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        super().__init__(f"non-finite loss at step {step}: {shown}")
        self.step, self.terms = step, terms


# --------------------------------------------------------------------------- tasks


class ClassifyTask:
    """Pneumonia yes/no: binary cross-entropy on one logit; unlabelled samples masked."""

    name = "classify"
    terms = ("loss",)

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def loss(self, model: nn.Module, out: torch.Tensor, batch: DeviceBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        labelled = batch.target >= 0
        bce = F.binary_cross_entropy_with_logits(
            out.float(), batch.target.clamp(min=0).float(), reduction="none"
        )
        total = (bce * labelled).sum() / labelled.sum().clamp(min=1)
        return total, [total.detach()]

    def predict(self, out: torch.Tensor, batch: DeviceBatch, host: HostBatch) -> list[tuple]:
        probs = torch.sigmoid(out.float()).cpu().numpy()
        return [(int(host.index[i]), float(probs[i]), int(host.target[i]))
                for i in range(len(host)) if bool(host.valid[i])]

    def metrics(self, records: list[tuple]) -> dict[str, Any]:
        probs = np.array([r[1] for r in records])
        targets = np.array([r[2] for r in records])
        labelled = targets >= 0
        return M.classification_metrics(probs[labelled], targets[labelled], self.threshold)


class DetectTask:
    """Opacity boxes: the YOLOv8 loss (``v8DetectionLoss``), ultralytics NMS.

    YOLOv8 is anchor-free (each grid cell regresses distances to the box sides, assigned by
    the task-aligned assigner), so there are no anchors to fit to the RSNA box sizes.
    """

    name = "detect"
    terms = ("loss", "box", "cls", "dfl")

    def __init__(self, model: nn.Module, *, stored_size: int, conf: float, iou: float,
                 max_det: int) -> None:
        self.criterion = DetectionLoss(model)
        self.stored_size, self.conf, self.iou, self.max_det = stored_size, conf, iou, max_det

    def loss(self, model: nn.Module, out: Any, batch: DeviceBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        total, terms = self.criterion(out, batch.boxes_per_image(), image_size=batch.size)
        return total, [total.detach(), terms["box"], terms["cls"], terms["dfl"]]

    def detections(self, out: Any, size: int, *, conf: float) -> list[np.ndarray]:
        """Per image (M, 5) ``[x1, y1, x2, y2, conf]`` in stored-image pixels."""
        dets = postprocess_detections(out, conf=conf, iou=self.iou, max_det=max(self.max_det, 100))
        scale = self.stored_size / size
        for d in dets:
            d[:, :4] *= scale
        return dets

    def predict(self, out: Any, batch: DeviceBatch, host: HostBatch) -> list[tuple]:
        dets = self.detections(out, batch.size, conf=MAP_CONF)
        truths = [host.boxes[host.box_index == i].numpy() for i in range(len(host))]
        return [(int(host.index[i]), dets[i], truths[i], int(host.target[i]))
                for i in range(len(host)) if bool(host.valid[i])]

    def metrics(self, records: list[tuple]) -> dict[str, Any]:
        dets = [r[1] for r in records]
        truths = [r[2] for r in records]
        top = [d[: self.max_det] for d in dets]
        out: dict[str, Any] = {"map50": M.average_precision_50(top, truths)}
        out["rsna"] = M.rsna_score([d[d[:, 4] >= self.conf] for d in top], truths)
        best = max(RSNA_CONF_GRID, key=lambda c: _nan_low(M.rsna_score([d[d[:, 4] >= c] for d in top], truths)))
        out["rsna_best"] = M.rsna_score([d[d[:, 4] >= best] for d in top], truths)
        out["rsna_best_conf"] = best
        out["conf"] = self.conf
        targets = np.array([r[3] for r in records])
        score = np.array([float(d[:, 4].max()) if len(d) else 0.0 for d in dets])
        labelled = targets >= 0
        out["image_auc"] = M.roc_auc(score[labelled], targets[labelled])
        out["boxes_true"] = int(sum(len(t) for t in truths))
        return out


def _nan_low(x: float) -> float:
    return -1.0 if math.isnan(x) else x


# --------------------------------------------------------------------------- run state


class LossGuard:
    """Remembers the first step whose (rank-averaged) loss terms were not finite.

    Updated every step on the device without a host sync; :meth:`check` (at logging,
    checkpoint and evaluation time) raises :class:`NonFiniteLossError` on every rank at
    once, since every rank holds the same all-reduced values.
    """

    def __init__(self, names: tuple[str, ...]) -> None:
        self.names = names
        self.first: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def update(self, step: int, terms: torch.Tensor) -> None:
        if self.first is None:
            self.first = torch.full((), -1, dtype=torch.int64, device=terms.device)
            self.values = torch.zeros_like(terms)
        take = ~torch.isfinite(terms).all() & (self.first < 0)
        self.first = torch.where(take, torch.full_like(self.first, step), self.first)
        self.values = torch.where(take, terms, self.values)

    def check(self) -> None:
        if self.first is not None and int(self.first) >= 0:
            assert self.values is not None
            raise NonFiniteLossError(int(self.first), dict(zip(self.names, self.values.tolist())))


class Meter:
    """Sums over a logging window: loss terms, steps, images, time, time waiting for data."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.terms: torch.Tensor | None = None
        self.steps = self.images = 0
        self.wait = 0.0
        self.start = time.perf_counter()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Leave the enclosed time (evaluation, checkpoints) out of the throughput."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - t0

    def add(self, terms: torch.Tensor, images: int, wait: float) -> None:
        self.terms = terms.clone() if self.terms is None else self.terms + terms
        self.steps += 1
        self.images += images
        self.wait += wait


class MetricsWriter:
    """Appends JSON lines to ``metrics.jsonl`` (rank 0 only; nan/inf written as null)."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict[str, Any]) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(_jsonable(record), allow_nan=False) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


@dataclasses.dataclass(kw_only=True)
class Run:
    """Everything a training run holds; built by :func:`build_run`."""

    cfg: TrainConfig
    env: DistEnv
    model: nn.Module
    """The wrapped model (DDP, FSDP2 or plain)."""
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    task: ClassifyTask | DetectTask
    train_loader: ShardLoader
    val_loader: ShardLoader | None
    image_size: int
    """Side the network sees."""
    stored_size: int
    """Side of the images in the shards."""
    writer: MetricsWriter
    guard: LossGuard
    step: int = 0
    """Optimizer steps done."""
    last_eval: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def out(self) -> Path:
        assert self.cfg.out is not None
        return self.cfg.out

    @property
    def total_steps(self) -> int:
        """Steps of the whole schedule (all epochs)."""
        return self.cfg.epochs * self.train_loader.steps

    @property
    def last_step(self) -> int:
        """Where this invocation stops (``max_steps`` or the end of the last epoch)."""
        return min(self.total_steps, self.cfg.max_steps or self.total_steps)


# --------------------------------------------------------------------------- the loop


def train(run: Run) -> dict[str, Any]:
    """Train from ``run.step`` to ``run.last_step``: evaluate and checkpoint after each
    epoch (and when stopping mid-epoch), export ``model.pt`` at the end.

    Returns:
        The last evaluation's metrics.
    """
    cfg, steps = run.cfg, run.train_loader.steps
    logger.info("training %s from step %d to %d (%d steps/epoch, global batch %d, %d ranks)",
                run.task.name, run.step, run.last_step, steps, cfg.data.batch_size, run.env.world_size)
    meter = Meter()
    while run.step < run.last_step:
        epoch, first = divmod(run.step, steps)
        bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not run.env.is_main, dynamic_ncols=True, leave=False)
        seen, tick = 0, time.perf_counter()
        for batch in run.train_loader.epoch(epoch, first):
            wait = time.perf_counter() - tick
            terms = train_step(run, batch, epoch)
            meter.add(terms, len(batch) * run.env.world_size, wait)
            seen += 1
            bar.update()
            if run.step % cfg.log_every == 0 or run.step == run.last_step:
                log_train(run, meter, epoch, bar)
            if run.step == run.last_step:
                break
            if run.step % cfg.ckpt_every == 0 and run.step % steps:
                with meter.paused():
                    checkpoint(run)
            tick = time.perf_counter()
        bar.close()
        with meter.paused():
            end_epoch(run, epoch, batches=seen)
    if not run.last_eval:  # resumed a finished run: evaluate what is there
        run.last_eval = evaluate(run)
        write_eval(run, max(0, run.step - 1) // steps, partial=False, batches=0)
    export(run)
    return run.last_eval


def end_epoch(run: Run, epoch: int, *, batches: int) -> None:
    """After an epoch (or a stop mid-epoch): check the loss, recompute the BatchNorm
    statistics, evaluate, record the metrics, checkpoint."""
    run.guard.check()
    recompute_bn_stats(run, epoch)
    run.last_eval = evaluate(run)
    write_eval(run, epoch, partial=run.step % run.train_loader.steps != 0, batches=batches)
    checkpoint(run)


def _since(t: float) -> float:
    return time.perf_counter() - t


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank, 0xD20]).generate_state(1, np.uint64)[0] >> np.uint64(1))


def train_step(run: Run, batch: HostBatch, epoch: int) -> torch.Tensor:
    """One optimizer step on this rank's batch.

    Dropout and every other use of torch's random generator are seeded from (seed, step,
    rank), so a resumed run repeats the interrupted run's steps exactly.

    Returns:
        The loss terms averaged over ranks, ``[total, *terms]`` (on the device, no sync).
    """
    cfg, env = run.cfg, run.env
    torch.manual_seed(_step_seed(cfg.seed, run.step, env.rank))
    dev = to_device(batch, env.device, run.image_size)
    if cfg.augment.enabled:
        params = step_params(cfg.augment, seed=cfg.seed, epoch=epoch, step=batch.step,
                             global_batch=cfg.data.batch_size, rank=env.rank, world=env.world_size)
        dev.images, dev.boxes, dev.box_index = augment(dev.images, dev.boxes, dev.box_index, params)
    run.model.train()
    with autocast_context(cfg.parallel.amp, env.device):
        out = run.model(dev.images)
    total, terms = run.task.loss(run.model, out, dev)
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(total).backward()
    if cfg.optim.grad_clip is not None:
        run.scaler.unscale_(run.optimizer)
        nn.utils.clip_grad_norm_(run.model.parameters(), cfg.optim.grad_clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    run.step += 1
    reduced = all_reduce_sum(torch.stack(terms).float()) / env.world_size
    run.guard.update(run.step, reduced)
    return reduced


def log_train(run: Run, meter: Meter, epoch: int, bar: tqdm) -> None:
    """Check the loss, write a ``train`` line to metrics.jsonl and update the bar."""
    run.guard.check()
    assert meter.terms is not None
    elapsed = max(_since(meter.start), 1e-9)
    terms = (meter.terms / meter.steps).tolist()
    record = {
        "kind": "train", "step": run.step, "epoch": epoch,
        **dict(zip(run.task.terms, terms)),
        "lr": run.scheduler.get_last_lr()[0],
        "images_per_s": meter.images / elapsed,
        "data_wait": min(1.0, max(0.0, meter.wait / elapsed)),
        **peak_memory(run.env.device),
        "time": time.time(),
    }
    run.writer.write(record)
    bar.set_postfix(loss=f"{terms[0]:.4f}", ips=f"{record['images_per_s']:.0f}")
    logger.debug("step %d loss %.4f", run.step, terms[0])
    meter.reset()


def peak_memory(device: torch.device) -> dict[str, Any]:
    """Peak memory of this process in MiB: CUDA allocated on a GPU, resident set on CPU."""
    if device.type == "cuda":
        return {"peak_mem_mb": torch.cuda.max_memory_allocated(device) / 2**20, "mem_kind": "cuda_allocated"}
    return {"peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "mem_kind": "cpu_rss"}


@torch.no_grad()
def recompute_bn_stats(run: Run, epoch: int) -> None:
    """Re-estimate every BatchNorm's running statistics ("precise BN").

    Runs the first ``eval.bn_batches`` training batches of ``epoch`` (without
    augmentation) forward in train mode with a cumulative average, then averages the
    statistics over ranks. Running averages with momentum lag far behind the weights in
    short runs and make eval-mode outputs meaningless; training itself never reads them,
    so this changes no training step.
    """
    n = min(run.cfg.eval.bn_batches, run.train_loader.steps)
    model = run.model
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if n == 0 or not bns:
        return
    # DDP would broadcast rank 0's buffers at every forward: run its inner module instead.
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average over the batches below
    net.train()
    for i, batch in enumerate(run.train_loader.epoch(epoch)):
        if i == n:
            break
        with autocast_context(run.cfg.parallel.amp, run.env.device):
            net(to_device(batch, run.env.device, run.image_size).images)
    for bn, momentum in zip(bns, momenta):
        bn.momentum = momentum
        for buf in (bn.running_mean, bn.running_var):
            if buf is not None:
                buf.copy_(all_reduce_sum(buf.clone()) / run.env.world_size)


def _sync_buffers(run: Run) -> None:
    """FSDP2 keeps each rank's BatchNorm statistics: use rank 0's for eval and saving."""
    if run.cfg.parallel.strategy == "fsdp":
        broadcast_buffers(run.model)


@torch.no_grad()
def evaluate(run: Run) -> dict[str, Any]:
    """One pass over ``val`` on all ranks; every sample counted exactly once.

    Predictions are gathered on every rank (``all_gather_object``; small) and the padding
    slots dropped; a sample seen twice or not at all is an error.

    Returns:
        The task's metrics plus ``samples`` (empty when there is no val split).
    """
    if run.val_loader is None:
        return {}
    run.guard.check()
    _sync_buffers(run)
    run.model.eval()
    t0 = time.perf_counter()
    records: list[tuple] = []
    batches = 0
    for batch in run.val_loader.epoch(0):
        dev = to_device(batch, run.env.device, run.image_size)
        with autocast_context(run.cfg.parallel.amp, run.env.device):
            out = run.model(dev.images)
        records.extend(run.task.predict(out, dev, batch))
        batches += 1
    run.model.train()
    gathered = all_gather_object((batches, records))
    merged = [r for _, part in gathered for r in part]
    seen = [r[0] for r in merged]
    expected = run.val_loader.info.samples
    if len(seen) != expected or len(set(seen)) != expected:
        raise RuntimeError(f"evaluation saw {len(seen)} samples ({len(set(seen))} distinct), "
                           f"val has {expected}")
    result = run.task.metrics(merged)
    result.update(samples=len(seen), batches_per_rank=[b for b, _ in gathered],
                  seconds=time.perf_counter() - t0)
    return result


def write_eval(run: Run, epoch: int, *, partial: bool, batches: int) -> None:
    """Log the evaluation, append it to metrics.jsonl and replace eval.json.

    Collective: ``batches`` (training batches this rank took in the epoch, in this
    invocation) is gathered from every rank and recorded; they must all be equal.
    """
    per_rank = [int(n) for n in all_gather_object(batches)]
    if not run.last_eval:
        return
    record = {"kind": "eval", "step": run.step, "epoch": epoch, "partial_epoch": partial,
              "train_batches_per_rank": per_rank, **run.last_eval}
    run.writer.write(record)
    if run.env.is_main:
        text = json.dumps(_jsonable(record), indent=2, allow_nan=False) + "\n"
        (run.out / EVAL_NAME).write_text(text)
        keys = ("accuracy", "roc_auc", "sensitivity", "specificity", "f1", "baseline_accuracy") \
            if run.task.name == "classify" else ("map50", "rsna", "rsna_best", "rsna_best_conf", "image_auc")
        shown = " ".join(f"{k}={run.last_eval.get(k, float('nan')):.4f}" for k in keys)
        logger.info("eval epoch %d step %d: %s (%d samples)", epoch + 1, run.step, shown,
                    run.last_eval["samples"])


def train_state(run: Run) -> dict[str, Any]:
    """The plain values saved with a checkpoint."""
    return {
        "step": run.step, "epoch": run.step // run.train_loader.steps,
        "global_batch": run.cfg.data.batch_size, "lanes": run.cfg.data.num_lanes,
        "seed": run.cfg.seed, "steps_per_epoch": run.train_loader.steps,
        "world_size": run.env.world_size,
    }


def checkpoint(run: Run) -> None:
    """Save a DCP checkpoint of the run (every rank)."""
    run.guard.check()
    _sync_buffers(run)
    save_checkpoint(run.out, step=run.step, model=run.model, optimizer=run.optimizer,
                    scheduler=run.scheduler, scaler=run.scaler, train_state=train_state(run),
                    keep=run.cfg.keep_checkpoints)


def resume(run: Run) -> None:
    """Restore the latest checkpoint of ``run.out`` (a fresh start if there is none)."""
    path = latest_checkpoint(run.out)
    if path is None:
        logger.warning("--resume: no checkpoint in %s; starting from scratch", run.out)
        return
    state = load_checkpoint(path, model=run.model, optimizer=run.optimizer,
                            scheduler=run.scheduler, scaler=run.scaler)
    mine = train_state(run)
    for key in ("global_batch", "lanes", "seed", "steps_per_epoch"):
        if state.get(key) != mine[key]:
            raise ValueError(f"cannot resume {path}: {key} was {state.get(key)}, now {mine[key]} "
                             "(the sample order would change; keep the global batch, lanes and seed)")
    run.step = int(state["step"])
    if state.get("world_size") != run.env.world_size:
        logger.info("resuming a %s-rank checkpoint on %d ranks", state.get("world_size"), run.env.world_size)


def export(run: Run) -> None:
    """Write ``RUN/model.pt``: full weights, task, sizes, thresholds and the config."""
    _sync_buffers(run)
    cfg = run.cfg
    info = {
        "task": run.task.name, "arch": cfg.model.name, "image_size": run.image_size,
        "stored_size": run.stored_size, "step": run.step,
        "classifier": {"width": cfg.model.width, "depth": cfg.model.depth, "dropout": cfg.model.dropout},
        "threshold": cfg.eval.threshold, "conf": cfg.eval.conf, "iou": cfg.eval.iou,
        "max_det": cfg.eval.max_det, "amp": cfg.parallel.amp, "config": cfg.to_dict(),
        "metrics": _jsonable(run.last_eval),
    }
    export_model(run.out / EXPORT_NAME, run.model, info)


# --------------------------------------------------------------------------- building


def build_model(task: str, arch: str, *, width: int = 32, depth: int = 4, dropout: float = 0.2,
                prior: float | None = None, weights: Path | None = None) -> tuple[nn.Module, list[nn.Module]]:
    """The unwrapped network and its main blocks (the FSDP2 units).

    Args:
        task: ``classify`` or ``detect``.
        arch: ``cnn`` or a YOLOv8 name.
        width, depth, dropout: Classifier shape.
        prior: Classifier: initial positive probability (the train positive rate).
        weights: Initial weights: a state_dict file, or a dict holding one under
            ``state_dict`` (this project's ``model.pt``); ultralytics checkpoints too for
            the detector.
    """
    if task == "classify":
        model = PneumoniaCNN(ClassifierConfig(width=width, depth=depth, dropout=dropout, prior=prior))
        if weights is not None:
            state = torch.load(weights, map_location="cpu", weights_only=True)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            state = {k.removeprefix("module."): v for k, v in state.items()}
            model.load_state_dict(state)
            logger.info("loaded classifier weights from %s", weights)
        return model, list(model.blocks)
    model = build_detector(arch, weights=weights)
    return model, detector_blocks(model)


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
    if not (cfg.data.path / MANIFEST_NAME).is_file():
        raise ValueError(f"{cfg.data.path} holds no {MANIFEST_NAME}: not a finished ingest "
                         "(run `python -m ingest --out DATASET ...` first)")
    manifest = read_manifest(cfg.data.path)
    labels = read_labels(cfg.data.path / LABELS_NAME)
    world = env.world_size
    if cfg.data.batch_size % world or cfg.data.num_lanes % world:
        raise ValueError(f"the world size {world} must divide data.batch_size="
                         f"{cfg.data.batch_size} and the {cfg.data.num_lanes} lanes")
    train_info = read_split(cfg.data.path, "train", manifest=manifest, labels=labels)
    targets = train_info.split_targets()
    if cfg.model.task == "detect" and (targets < 0).any():
        raise ValueError(f"the train split has {(targets < 0).sum()} unlabelled samples; "
                         "detection training needs labels")
    if not (targets >= 0).any():
        raise ValueError("the train split has no labelled samples")
    pin = env.device.type == "cuda"
    train_loader = ShardLoader(
        train_info, rank=env.rank, world=world, global_batch=cfg.data.batch_size,
        lanes=cfg.data.num_lanes, workers=cfg.data.num_workers, seed=cfg.seed, train=True,
        window=cfg.data.shuffle_window, prefetch=cfg.data.prefetch, pin_memory=pin,
    )
    val_loader = None
    val_info = read_split(cfg.data.path, "val", manifest=manifest, labels=labels)
    if val_info.samples:
        val_loader = eval_loader(val_info, env, batch_size=cfg.data.eval_batch_size,
                                 workers=cfg.data.num_workers, prefetch=cfg.data.prefetch)
    else:
        logger.warning("no val split in %s: no evaluation", cfg.data.path)

    stored = manifest.size
    image_size = cfg.data.image_size or stored
    positive = float((targets == 1).sum() / max(1, (targets >= 0).sum()))
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (FSDP2 needs it)
    model, blocks = build_model(
        cfg.model.task, cfg.model.name or "", width=cfg.model.width, depth=cfg.model.depth,
        dropout=cfg.model.dropout, prior=min(max(positive, 0.01), 0.99), weights=cfg.model.weights,
    )
    task: ClassifyTask | DetectTask
    if cfg.model.task == "classify":
        task = ClassifyTask(cfg.eval.threshold)
    else:
        task = DetectTask(model, stored_size=stored, conf=cfg.eval.conf, iou=cfg.eval.iou,
                          max_det=cfg.eval.max_det)
    model = parallelize(model, env, strategy=cfg.parallel.strategy, blocks=blocks, amp=cfg.parallel.amp)
    optimizer = build_optimizer(model, cfg)
    total = cfg.epochs * train_loader.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
        s, total=total, warmup=cfg.optim.warmup, schedule=cfg.optim.schedule,
        min_ratio=cfg.optim.min_lr_ratio))
    scaler = make_grad_scaler(cfg.parallel.amp, env.device, sharded=cfg.parallel.strategy == "fsdp")
    if env.is_main:
        cfg.out.mkdir(parents=True, exist_ok=True)
        (cfg.out / CONFIG_NAME).write_text(dump_toml(cfg))
    run = Run(
        cfg=cfg, env=env, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler,
        task=task, train_loader=train_loader, val_loader=val_loader, image_size=image_size,
        stored_size=stored, writer=MetricsWriter(cfg.out / METRICS_NAME, env.is_main),
        guard=LossGuard(task.terms),
    )
    logger.info("dataset %s: %d train samples (%.1f%% positive) in %d shards, %d val; "
                "images %d px stored, %d px trained", cfg.data.path, train_info.samples,
                100 * positive, len(train_info.shards), val_info.samples, stored, image_size)
    if cfg.resume:
        resume(run)
    return run


def eval_loader(info: Any, env: DistEnv, *, batch_size: int, workers: int, prefetch: int = 2,
                with_meta: bool = False) -> ShardLoader:
    """A loader that gives every sample of a split once over all ranks (padding masked).

    Each rank gets ``batch_size`` samples per batch, split into as many lanes as the
    largest divisor of ``batch_size`` not above ``workers`` (one DataLoader worker each).
    """
    per_rank = max(d for d in range(1, max(workers, 1) + 1) if batch_size % d == 0)
    return ShardLoader(
        info, rank=env.rank, world=env.world_size, global_batch=batch_size * env.world_size,
        lanes=per_rank * env.world_size, workers=workers, train=False, prefetch=prefetch,
        with_meta=with_meta, pin_memory=env.device.type == "cuda",
    )
