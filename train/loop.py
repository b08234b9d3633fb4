"""The training loop: :func:`train` runs a built :class:`~train.state.Run` (see
:mod:`train.build`), :func:`train_step` is one optimizer step and :func:`evaluate` one pass
over ``val``.

Both tasks share the loop; what differs (loss, what a prediction is, which metrics) is in
:mod:`train.tasks`. Checkpointing, evaluation and metric writing are named calls from
:func:`train` and :func:`train_epoch`: :func:`checkpoint`, :func:`end_epoch`,
:func:`log_train`, :func:`write_eval`, :func:`export`.

Outputs in the run folder: ``metrics.jsonl`` (one line per logging step: losses, learning
rate, images/s, the fraction of step time spent waiting for data, peak memory; one per
evaluation), ``eval.json`` (the latest evaluation), ``config.toml``, ``checkpoints/`` and,
at the end, ``model.pt``.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from shards.atomic import atomic_write_text
from shards.qa import QA_FLAGS, qa_mask
from shards.seeds import step_seed
from train.augment import augment, step_params
from train.checkpoint import EXPORT_NAME, export_model, save_checkpoint
from train.data import HostBatch, to_device
from train.distributed import (
    all_gather_object,
    all_reduce_sum,
    autocast_context,
    broadcast_buffers,
    slow_amp_warning,
)
from train.state import EVAL_NAME, Meter, Run, jsonable
from train.tasks import EvalRecord

__all__ = [
    "checkpoint",
    "end_epoch",
    "evaluate",
    "export",
    "recompute_bn_stats",
    "train",
    "train_epoch",
    "train_step",
    "write_eval",
]

log = logging.getLogger(__name__)


def train(run: Run) -> dict[str, Any]:
    """Train from ``run.step`` to ``run.last_step``: evaluate and checkpoint after each
    epoch (and when stopping mid-epoch), export ``model.pt`` at the end.

    Returns:
        The last evaluation's metrics.
    """
    log.info("training %s from step %d to %d (%d steps/epoch, global batch %d, %d ranks)",
             run.task.name, run.step, run.last_step, run.train_loader.steps,
             run.cfg.data.batch_size, run.env.world_size)
    if run.env.is_main and (slow := slow_amp_warning(run.cfg.parallel.amp, run.env.device)):
        log.warning(slow)
    meter = Meter()
    while run.step < run.last_step:
        epoch, first = divmod(run.step, run.train_loader.steps)
        batches = train_epoch(run, meter, epoch, first)
        with meter.paused():
            end_epoch(run, epoch, batches=batches)
    if not run.last_eval:  # resumed a finished run: evaluate what is there
        run.last_eval = evaluate(run)
        write_eval(run, max(0, run.step - 1) // run.train_loader.steps, partial=False, batches=0)
    export(run)
    return run.last_eval


def train_epoch(run: Run, meter: Meter, epoch: int, first: int) -> int:
    """Steps from batch ``first`` of ``epoch`` to the epoch's end or ``run.last_step``,
    writing a metrics line every ``log_every`` steps and checkpointing every ``ckpt_every``
    steps inside the epoch (the epoch's end is checkpointed by :func:`end_epoch`).

    Returns:
        The batches this rank took.
    """
    cfg, steps = run.cfg, run.train_loader.steps
    bar = tqdm(total=steps, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}",
               disable=not run.env.is_main, dynamic_ncols=True, leave=False)
    seen, tick = 0, time.perf_counter()
    with bar:  # closed (and cleared) on a stop too, so that the stop's one line stands alone
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
    return seen


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


def train_step(run: Run, batch: HostBatch, epoch: int) -> torch.Tensor:
    """One optimizer step on this rank's batch.

    Dropout and every other use of torch's random generator are seeded from (seed, step,
    rank), so a resumed run repeats the interrupted run's steps exactly.

    Returns:
        The loss terms averaged over ranks, ``[total, *terms]`` (on the device, no sync).
    """
    cfg, env = run.cfg, run.env
    torch.manual_seed(step_seed(cfg.seed, run.step, env.rank))
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
    log.debug("step %d loss %.4f", run.step, terms[0])
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
        The task's metrics plus ``samples`` (empty when there is no val split), and under
        ``without_qa`` the same metrics over the samples that carry none of the QA flags
        (``--exclude-qa``'s, else every flag), when some samples do.
    """
    if run.val_loader is None:
        return {}
    run.guard.check()
    _sync_buffers(run)
    run.model.eval()
    t0 = time.perf_counter()
    records: list[EvalRecord] = []
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
    seen = [r.index for r in merged]
    expected = run.val_loader.info.samples
    if len(seen) != expected or len(set(seen)) != expected:
        raise RuntimeError(f"evaluation saw {len(seen)} samples ({len(set(seen))} distinct), "
                           f"val has {expected}")
    result = run.task.metrics(merged)
    result.update(samples=len(seen), batches_per_rank=[b for b, _ in gathered],
                  seconds=time.perf_counter() - t0)
    flags = run.cfg.data.exclude_qa or list(QA_FLAGS)
    qa = run.val_loader.info.qa
    unflagged = [r for r in merged if not int(qa[r[0]]) & qa_mask(flags)] if qa is not None else merged
    if len(unflagged) < len(merged):
        result["without_qa"] = {"flags": flags, "samples": len(unflagged),
                                **(run.task.metrics(unflagged) if unflagged else {})}
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
        text = json.dumps(jsonable(record), indent=2, allow_nan=False) + "\n"
        atomic_write_text(run.out / EVAL_NAME, text, durable=False)  # whole, or the last one kept
        shown = " ".join(f"{k}={run.last_eval.get(k, float('nan')):.4f}" for k in run.task.summary)
        log.info("eval epoch %d step %d: %s (%d samples)", epoch + 1, run.step, shown,
                    run.last_eval["samples"])
        without = run.last_eval.get("without_qa")
        if without:
            shown = " ".join(f"{k}={without.get(k, float('nan')):.4f}" for k in run.task.summary)
            log.info("eval epoch %d step %d without QA flags %s: %s (%d samples)", epoch + 1, run.step,
                     ",".join(without["flags"]), shown, without["samples"])


def checkpoint(run: Run) -> None:
    """Save a DCP checkpoint of the run (every rank)."""
    run.guard.check()
    _sync_buffers(run)
    save_checkpoint(run.out, step=run.step, model=run.model, optimizer=run.optimizer,
                    scheduler=run.scheduler, scaler=run.scaler, train_state=run.train_state(),
                    keep=run.cfg.keep_checkpoints)


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
        "metrics": jsonable(run.last_eval),
    }
    export_model(run.out / EXPORT_NAME, run.model, info)
