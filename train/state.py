"""What a training run holds (:class:`Run`) and the small pieces of state the loop keeps:
the non-finite loss guard, the throughput meter and the ``metrics.jsonl`` writer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from train.config import TrainConfig
from train.data import ShardLoader
from train.distributed import DistEnv
from train.tasks import Task

__all__ = [
    "CONFIG_NAME",
    "EVAL_NAME",
    "METRICS_NAME",
    "LossGuard",
    "Meter",
    "MetricsWriter",
    "NonFiniteLossError",
    "Run",
    "jsonable",
]

METRICS_NAME = "metrics.jsonl"
EVAL_NAME = "eval.json"
CONFIG_NAME = "config.toml"


class NonFiniteLossError(RuntimeError):
    """The loss became nan or inf; the run stops."""

    def __init__(self, step: int, terms: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.6g}" for k, v in terms.items())
        super().__init__(f"non-finite loss at step {step}: {shown}")
        self.step, self.terms = step, terms


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
                f.write(json.dumps(jsonable(record), allow_nan=False) + "\n")


def jsonable(value: Any) -> Any:
    """``value`` with numpy scalars as Python numbers and nan/inf as None (strict JSON)."""
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
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
    task: Task
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

    def train_state(self) -> dict[str, Any]:
        """The plain values saved with a checkpoint."""
        return {
            "step": self.step, "epoch": self.step // self.train_loader.steps,
            "global_batch": self.cfg.data.batch_size, "lanes": self.cfg.data.num_lanes,
            "seed": self.cfg.seed, "steps_per_epoch": self.train_loader.steps,
            "world_size": self.env.world_size, "exclude_qa": list(self.cfg.data.exclude_qa),
            "data_version": self.cfg.data.version, "manifest_sha256": self.cfg.data.manifest_sha256,
        }
