"""The optimizer side of a run, on tiny CPU models: the learning-rate schedule (``lr_factor``),
AdamW's weight-decay groups, gradient clipping in ``train_step`` and the precise-BN pass
(``recompute_bn_stats``). The run is assembled by hand around a stub loader."""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from train.build import build_optimizer, lr_factor
from train.config import TrainConfig
from train.data import HostBatch
from train.distributed import DistEnv
from train.loop import recompute_bn_stats, train_step
from train.state import LossGuard, MetricsWriter, Run
from train.tasks import ClassifyTask

# step, total, warmup fraction, schedule, min_ratio, factor
LR_CASES = [
    (0, 100, 0.1, "cosine", 0.05, 0.01),  # warm-up starts at 1% of the peak
    (5, 100, 0.1, "cosine", 0.05, 0.01 + 0.99 * 5 / 10),  # linear
    (9, 100, 0.1, "cosine", 0.05, 0.01 + 0.99 * 9 / 10),
    (10, 100, 0.1, "cosine", 0.05, 1.0),  # the peak right after warm-up
    (55, 100, 0.1, "cosine", 0.05, 0.05 + 0.95 * 0.5),  # half way down the cosine
    (100, 100, 0.1, "cosine", 0.05, 0.05),  # the floor at the end
    (150, 100, 0.1, "cosine", 0.05, 0.05),  # past the end: stays at the floor
    (0, 100, 0.0, "cosine", 0.0, 1.0),  # no warm-up
    (100, 100, 0.0, "cosine", 0.0, 0.0),
    (50, 100, 0.1, "constant", 0.05, 1.0),  # constant after warm-up
    (3, 100, 0.1, "constant", 0.05, 0.01 + 0.99 * 3 / 10),
    (0, 1, 0.05, "cosine", 0.05, 1.0),  # warm-up rounds to no step at all
]


@pytest.mark.parametrize(("step", "total", "warmup", "schedule", "min_ratio", "expected"), LR_CASES)
def test_lr_factor(step: int, total: int, warmup: float, schedule: str, min_ratio: float, expected: float):
    got = lr_factor(step, total=total, warmup=warmup, schedule=schedule, min_ratio=min_ratio)
    assert got == pytest.approx(expected)


def test_lr_factor_never_rises_after_the_peak():
    factors = [lr_factor(s, total=200, warmup=0.05, schedule="cosine", min_ratio=0.1) for s in range(10, 201)]
    assert all(a >= b for a, b in zip(factors, factors[1:]))


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3, bias=False), nn.BatchNorm2d(2), nn.Flatten(), nn.Linear(72, 1),
                         nn.Flatten(0))


def test_weight_decay_applies_to_matrices_and_kernels_only():
    torch.manual_seed(0)
    model = _net()
    model[3].bias.requires_grad_(False)  # frozen: in no group
    cfg = TrainConfig()
    cfg.optim.lr, cfg.optim.weight_decay = 0.1, 0.5
    optimizer = build_optimizer(model, cfg)
    decay, rest = optimizer.param_groups
    assert {id(p) for p in decay["params"]} == {id(model[0].weight), id(model[3].weight)}
    assert {id(p) for p in rest["params"]} == {id(model[1].weight), id(model[1].bias)}
    assert (decay["weight_decay"], rest["weight_decay"]) == (0.5, 0.0)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()  # zero gradients: only the decoupled decay moves a parameter
    for name, p in model.named_parameters():
        shrink = 1 - 0.1 * 0.5 if p.ndim >= 2 else 1.0
        assert torch.allclose(p, before[name] * shrink), name


class StubLoader:
    """Batches of 8x8 images whose pixels are all ``value``, one value per batch and sample."""

    def __init__(self, values: list[list[int]]) -> None:
        self.values = values
        self.steps = len(values)

    def epoch(self, epoch: int, first: int = 0) -> Iterator[HostBatch]:
        for step, vals in enumerate(self.values[first:], start=first):
            n = len(vals)
            yield HostBatch(step=step, images=torch.tensor(vals, dtype=torch.uint8)[:, None, None].expand(n, 8, 8),
                            target=torch.arange(n) % 2, boxes=torch.zeros(0, 4),
                            box_index=torch.zeros(0, dtype=torch.int64), index=torch.arange(n),
                            valid=torch.ones(n, dtype=torch.bool), keys=[f"k{i}" for i in range(n)])


def _run(tmp_path: Path, model: nn.Module, loader: StubLoader, *, grad_clip: float | None = None,
         bn_batches: int = 0, optimizer: torch.optim.Optimizer | None = None) -> Run:
    cfg = TrainConfig(out=tmp_path)
    cfg.optim.grad_clip, cfg.eval.bn_batches = grad_clip, bn_batches
    cfg.augment.enabled, cfg.parallel.amp = False, "none"
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=1.0)
    task = ClassifyTask(0.5)
    return Run(cfg=cfg, env=DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend=None),
               model=model, optimizer=optimizer,
               scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0),
               scaler=torch.amp.GradScaler("cpu", enabled=False), task=task, train_loader=loader,  # type: ignore[arg-type]
               val_loader=None, image_size=8, stored_size=8,
               writer=MetricsWriter(tmp_path / "metrics.jsonl", True), guard=LossGuard(task.terms))


def _raw_grad_norm(model: nn.Module, batch: HostBatch) -> float:
    from train.data import to_device

    model = model.train()
    model.zero_grad()
    dev = to_device(batch, torch.device("cpu"))
    ClassifyTask(0.5).loss(model, model(dev.images), dev)[0].backward()
    return math.sqrt(sum(float(p.grad.square().sum()) for p in model.parameters()))


@pytest.mark.parametrize("clip", [None, 1e-3, 1e6], ids=["off", "clips", "above-the-norm"])
def test_grad_clip_bounds_the_step(tmp_path: Path, clip: float | None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1), nn.Flatten(0))
    loader = StubLoader([[30, 200, 90, 10]])
    raw = _raw_grad_norm(model, next(loader.epoch(0)))
    before = [p.detach().clone() for p in model.parameters()]
    run = _run(tmp_path, model, loader, grad_clip=clip)  # plain SGD at lr 1: the step is the gradient
    train_step(run, next(loader.epoch(0)), epoch=0)
    moved = math.sqrt(sum(float((p.detach() - b).square().sum()) for p, b in zip(model.parameters(), before)))
    assert raw > 1e-2
    assert moved == pytest.approx(raw if clip is None else min(raw, clip), rel=1e-4)
    assert run.step == 1


BN_BATCHES = [[0, 0], [255, 255], [51, 51], [153, 153]]  # per-batch means 0, 1, 0.2, 0.6


# bn_batches, running mean afterwards (the plain mean of the first n batch means)
BN_CASES = [(1, 0.0), (2, 0.5), (3, 0.4), (16, 0.45)]  # 16: all four batches


@pytest.mark.parametrize(("n", "mean"), BN_CASES, ids=[f"n{n}" for n, _ in BN_CASES])
def test_recompute_bn_stats_averages_the_first_batches(tmp_path: Path, n: int, mean: float):
    model = nn.Sequential(nn.BatchNorm2d(1, momentum=0.3), nn.Flatten(), nn.Linear(64, 1), nn.Flatten(0))
    weights = [p.detach().clone() for p in model.parameters()]
    run = _run(tmp_path, model, StubLoader(BN_BATCHES), bn_batches=n)
    recompute_bn_stats(run, epoch=0)
    bn = model[0]
    assert bn.running_mean.item() == pytest.approx(mean, abs=1e-6)
    assert bn.running_var.item() == pytest.approx(0.0, abs=1e-6)  # every batch is flat
    assert bn.momentum == 0.3 and model.training
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))


def test_recompute_bn_stats_with_zero_batches_keeps_the_running_averages(tmp_path: Path):
    model = nn.Sequential(nn.BatchNorm2d(1), nn.Flatten(), nn.Linear(64, 1), nn.Flatten(0))
    model[0].running_mean.fill_(0.7)
    recompute_bn_stats(_run(tmp_path, model, StubLoader(BN_BATCHES), bn_batches=0), epoch=0)
    assert model[0].running_mean.item() == pytest.approx(0.7)
