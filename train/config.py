"""Configuration of a training run: one keyword-only dataclass per component, plus TOML.

Precedence, lowest first: the defaults here, the run's saved ``config.toml`` (with
``--resume``), a ``--config FILE.toml``, then command-line flags. A TOML file has the
top-level fields of :class:`TrainConfig` and one table per component::

    epochs = 20
    [data]
    path = "/scratch/rsna-shards"
    batch_size = 64
    [model]
    task = "detect"
    name = "yolov8s"
    [optim]
    lr = 0.001

Unknown keys are errors (a typo must not silently train the defaults). The resolved
configuration is written to ``RUN/config.toml`` by :func:`dump_toml`.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any, Literal, get_args

import tomli_w
import tomllib

from shards.qa import parse_qa_flags
from shards.store import normalize_location, redact_url

__all__ = [
    "AMP_CHOICES",
    "Amp",
    "DETECTORS",
    "STRATEGIES",
    "Strategy",
    "TASKS",
    "AugmentConfig",
    "DataConfig",
    "EvalConfig",
    "ModelConfig",
    "OptimConfig",
    "ParallelConfig",
    "TrainConfig",
    "dump_toml",
    "load_toml",
    "merge",
]

TASKS = ("classify", "detect")
DETECTORS = ("yolov8n", "yolov8s", "yolov8m", "yolov8l", "yolov8x")
"""YOLOv8 scales the detector can be built at (:func:`train.models.build_detector`)."""
CLASSIFIERS = ("cnn",)
Strategy = Literal["ddp", "fsdp"]
"""Data parallelism: DDP, or FSDP2 (``fully_shard``); see :func:`train.distributed.parallelize`."""
STRATEGIES: tuple[str, ...] = get_args(Strategy)
Amp = Literal["bf16", "fp16", "none"]
"""Autocast dtypes (``none``: fp32); see :func:`train.distributed.autocast_context`."""
AMP_CHOICES: tuple[str, ...] = get_args(Amp)
SCHEDULES = ("cosine", "constant")
DEFAULT_MAX_LANES = 16
"""Default lanes: the largest divisor of the global batch up to this (world sizes that
divide it can resume each other's runs; set ``data.lanes`` for more ranks)."""


def _positive(name: str, value: Any, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r}: must be an int >= 1" + (" or unset" if allow_none else ""))


def _fraction(name: str, value: float, lo: float = 0.0, hi: float = 1.0) -> None:
    if not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise ValueError(f"{name}={value!r}: allowed {lo}..{hi}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r}: allowed {', '.join(allowed)}")


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    """The streaming loader (see :mod:`train.data`)."""

    path: Path | str | None = None
    """Dataset written by ``python -m ingest`` (holds ``manifest.json``): a folder, or a URL
    (``s3://bucket/prefix``, ``http(s)://host/path``, ``file://``; see :mod:`shards.store`)."""
    cache_dir: Path | None = None
    """Node-local folder keeping fetched shards of a remote dataset (see :mod:`shards.cache`);
    unset: a temporary one holding only the shards in use."""
    cache_limit: float | None = None
    """GB of shards ``cache_dir`` keeps (least recently used evicted first); unset: no limit."""
    batch_size: int = 32
    """Global batch size: samples per optimizer step over all ranks (split evenly among
    them). Kept fixed when the world size changes, so the sample order does not."""
    eval_batch_size: int = 32
    """Evaluation and prediction batch size per rank."""
    workers: int | None = None
    """DataLoader worker processes per rank (0: read in the training process). Default: 0
    where the rank has 2 CPUs or fewer (its reader threads read about 3x faster than 2 workers
    there), else up to 4, at most this process's CPUs divided by the ranks on the node."""
    lanes: int | None = None
    """Parallel sample streams of an epoch (see :mod:`train.data`); must divide
    ``batch_size``, and the world size must divide it. Default: the largest divisor of
    ``batch_size`` up to 16. Each lane boundary costs one extra partial shard read per
    epoch; a rank can use at most ``lanes / world`` DataLoader workers."""
    shuffle_window: int = 64
    """Samples permuted together inside each lane (memory: this many images per lane)."""
    image_size: int | None = None
    """Train and evaluate at this side (resized on the device); default: the stored size."""
    prefetch: int = 2
    """Batches each DataLoader worker prepares ahead."""
    threads: int | None = None
    """Reader threads in each process that reads lanes (see :mod:`train.lane_threads`; 0:
    the lanes are read in that process's main thread). Default: 2 without DataLoader
    workers (the reads overlap the training step and each other), 0 in each worker."""
    exclude_qa: list[str] | str = dataclasses.field(default_factory=list)
    """QA flags (``shards.qa.QA_FLAGS``) whose samples leave the training plan; a list or
    ``flag,flag``. Part of the sample order: ``--resume`` refuses a different set."""
    exclude_qa_eval: bool = False
    """Evaluation leaves the ``exclude_qa`` samples out too (by default it keeps every sample
    and reports its metrics with and without them)."""
    version: int | None = None
    """The dataset version the run trains on (``--data OUT@vN``, else the latest when it
    starts): recorded in ``config.toml`` by the run, not set by hand."""
    manifest_sha256: str | None = None
    """SHA-256 of that version's manifest, recorded beside it; ``--resume`` refuses another."""

    def __post_init__(self) -> None:
        self.path = normalize_location(self.path) if self.path is not None else None
        try:
            text = self.exclude_qa if isinstance(self.exclude_qa, str) else ",".join(map(str, self.exclude_qa))
            self.exclude_qa = list(parse_qa_flags(text))
        except (TypeError, ValueError) as exc:
            raise ValueError(f"data.exclude_qa={self.exclude_qa!r}: {exc}") from None
        if not isinstance(self.exclude_qa_eval, bool):
            raise ValueError(f"data.exclude_qa_eval={self.exclude_qa_eval!r}: must be true or false")
        self.cache_dir = Path(self.cache_dir) if self.cache_dir is not None else None
        if self.cache_limit is not None and (isinstance(self.cache_limit, bool) or
                                             not isinstance(self.cache_limit, (int, float)) or self.cache_limit < 0):
            raise ValueError(f"data.cache_limit={self.cache_limit!r}: must be a number of GB >= 0 or unset")
        _positive("data.batch_size", self.batch_size)
        _positive("data.eval_batch_size", self.eval_batch_size)
        if self.workers is not None and (
            isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 0
        ):
            raise ValueError(f"data.workers={self.workers!r}: must be an int >= 0 or unset")
        if self.threads is not None and (
            isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 0
        ):
            raise ValueError(f"data.threads={self.threads!r}: must be an int >= 0 or unset")
        _positive("data.lanes", self.lanes, allow_none=True)
        if self.lanes is not None and self.batch_size % self.lanes:
            raise ValueError(
                f"data.lanes={self.lanes} does not divide data.batch_size={self.batch_size}"
            )
        _positive("data.shuffle_window", self.shuffle_window)
        _positive("data.prefetch", self.prefetch)
        if self.image_size is not None and (
            not isinstance(self.image_size, int) or not 32 <= self.image_size <= 4096
            or self.image_size % 32
        ):
            raise ValueError(f"data.image_size={self.image_size!r}: allowed multiples of 32 in 32..4096")

    @property
    def num_workers(self) -> int:
        """The workers actually used (``workers`` or its default)."""
        if self.workers is not None:
            return self.workers
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)
        per_rank = cpus // max(1, local_ranks)
        # On 2 CPUs a rank's reader threads read 11,500-13,000 samples/s, 2 workers 3,700-4,500
        # (docs/performance.md): each batch crosses processes and is copied once more.
        return 0 if per_rank <= 2 else min(4, per_rank)

    @property
    def num_lanes(self) -> int:
        """The lanes actually used (``lanes`` or its default)."""
        if self.lanes is not None:
            return self.lanes
        return max(d for d in range(1, min(self.batch_size, DEFAULT_MAX_LANES) + 1) if self.batch_size % d == 0)


@dataclasses.dataclass(kw_only=True)
class AugmentConfig:
    """Training augmentation, applied on the device to images and boxes alike."""

    enabled: bool = True
    """Augment training batches at all (never evaluation)."""
    flip: float = 0.5
    """Probability of a horizontal flip."""
    scale: float = 0.1
    """Zoom factor drawn uniformly from ``1 +- scale``."""
    translate: float = 0.05
    """Shift drawn uniformly from ``+- translate`` of the image side, per axis."""
    brightness: float = 0.1
    """Additive brightness drawn from ``+- brightness`` (images are in 0..1)."""
    contrast: float = 0.1
    """Contrast factor drawn from ``1 +- contrast`` (around each image's mean)."""

    def __post_init__(self) -> None:
        _fraction("augment.flip", self.flip)
        _fraction("augment.scale", self.scale, 0.0, 0.5)
        _fraction("augment.translate", self.translate, 0.0, 0.5)
        _fraction("augment.brightness", self.brightness, 0.0, 0.5)
        _fraction("augment.contrast", self.contrast, 0.0, 0.5)


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """What is trained."""

    task: str = "classify"
    """``classify`` (pneumonia yes/no, the CNN) or ``detect`` (opacity boxes, YOLOv8)."""
    name: str | None = None
    """``cnn`` for classify; one of :data:`DETECTORS` for detect (default ``yolov8n``)."""
    weights: Path | None = None
    """Initial weights (a state_dict, this project's ``model.pt``, or an ultralytics .pt
    for the detector: a 3-channel stem is summed to 1 channel, the 80-class head skipped)."""
    trust_weights: bool = False
    """Allow a full unpickle of ``weights`` (which can run code from the file): needed
    for an ultralytics .pt, which pickles the model object. Only for files you trust."""
    width: int = 32
    """Classifier: channels of the stem (stages double it, up to 256)."""
    depth: int = 4
    """Classifier: number of stride-2 stages."""
    dropout: float = 0.2
    """Classifier: dropout before the final linear layer."""

    def __post_init__(self) -> None:
        _choice("model.task", self.task, TASKS)
        if self.name is None:
            self.name = "cnn" if self.task == "classify" else "yolov8n"
        allowed = CLASSIFIERS if self.task == "classify" else DETECTORS
        _choice(f"model.name (task {self.task})", self.name, allowed)
        self.weights = Path(self.weights) if self.weights is not None else None
        if not isinstance(self.trust_weights, bool):
            raise ValueError(f"model.trust_weights={self.trust_weights!r}: must be true or false")
        _positive("model.width", self.width)
        _positive("model.depth", self.depth)
        _fraction("model.dropout", self.dropout, 0.0, 0.99)


@dataclasses.dataclass(kw_only=True)
class OptimConfig:
    """AdamW and its learning-rate schedule."""

    lr: float = 1e-3
    """Peak learning rate."""
    weight_decay: float = 0.05
    """Decoupled weight decay (not applied to biases and normalisation weights)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam's moment coefficients."""
    schedule: str = "cosine"
    """``cosine`` (to ``min_lr_ratio * lr`` at the end of the last epoch) or ``constant``."""
    warmup: float = 0.05
    """Fraction of all steps with a linear warm-up from 0.01 * lr."""
    min_lr_ratio: float = 0.05
    """Final learning rate as a fraction of ``lr`` (cosine)."""
    grad_clip: float | None = 10.0
    """Clip the global gradient norm to this (None: no clipping)."""

    def __post_init__(self) -> None:
        if not isinstance(self.lr, (int, float)) or not 0 < self.lr < 10:
            raise ValueError(f"optim.lr={self.lr!r}: allowed 0 < lr < 10")
        _fraction("optim.weight_decay", self.weight_decay, 0.0, 1.0)
        self.betas = tuple(self.betas)  # TOML gives a list
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas={self.betas!r}: two values in [0, 1)")
        _choice("optim.schedule", self.schedule, SCHEDULES)
        _fraction("optim.warmup", self.warmup, 0.0, 0.5)
        _fraction("optim.min_lr_ratio", self.min_lr_ratio)
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"optim.grad_clip={self.grad_clip!r}: must be > 0 or unset")


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    """Data parallelism and precision (see :mod:`train.distributed`)."""

    strategy: str = "ddp"
    """``ddp`` (DistributedDataParallel) or ``fsdp`` (FSDP2 ``fully_shard`` per block)."""
    amp: str = "bf16"
    """Autocast dtype of the forward pass: ``bf16``, ``fp16`` (with a GradScaler) or
    ``none``. Parameters, BatchNorm statistics and optimizer state stay float32."""

    def __post_init__(self) -> None:
        _choice("parallel.strategy", self.strategy, STRATEGIES)
        _choice("parallel.amp", self.amp, AMP_CHOICES)


@dataclasses.dataclass(kw_only=True)
class EvalConfig:
    """Validation after each epoch."""

    threshold: float = 0.5
    """Classifier: predicted positive when the probability is at least this."""
    conf: float = 0.3
    """Detector: boxes below this confidence are dropped for the RSNA score and
    ``predict`` (mAP@0.5 uses every box above 0.001)."""
    iou: float = 0.5
    """Detector: NMS IoU threshold."""
    max_det: int = 10
    """Detector: most boxes kept per image."""
    bn_batches: int = 16
    """Before each evaluation, recompute the BatchNorm statistics from this many training
    batches per rank (forward only, no augmentation; 0: keep the running averages, which
    lag behind the weights in short runs)."""

    def __post_init__(self) -> None:
        if isinstance(self.bn_batches, bool) or not isinstance(self.bn_batches, int) or self.bn_batches < 0:
            raise ValueError(f"eval.bn_batches={self.bn_batches!r}: must be an int >= 0")
        _fraction("eval.threshold", self.threshold)
        _fraction("eval.conf", self.conf)
        _fraction("eval.iou", self.iou)
        _positive("eval.max_det", self.max_det)


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """A whole training run: the top-level fields plus one table per component."""

    out: Path | None = None
    """Run folder: checkpoints, metrics.jsonl, eval.json, config.toml, model.pt."""
    epochs: int = 10
    """Passes over the training split; the learning-rate schedule spans all of them."""
    max_steps: int | None = None
    """Stop after this many optimizer steps in all (the schedule is not shortened)."""
    seed: int = 0
    """Seed of weights, sample order, augmentation and dropout."""
    log_every: int = 10
    """Write training metrics every this many steps."""
    ckpt_every: int = 500
    """Save a checkpoint every this many steps (and at each epoch end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept in ``RUN/checkpoints`` (the oldest are deleted)."""
    resume: bool = False
    """Continue from the latest checkpoint in ``out``."""
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    """The loader."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    """The network."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """The optimizer and schedule."""
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    """Training augmentation."""
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    """DDP/FSDP and mixed precision."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Validation."""

    def __post_init__(self) -> None:
        self.out = Path(self.out) if self.out is not None else None
        _positive("epochs", self.epochs)
        _positive("max_steps", self.max_steps, allow_none=True)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ValueError(f"seed={self.seed!r}: must be an int in 0..2**63-1")
        _positive("log_every", self.log_every)
        _positive("ckpt_every", self.ckpt_every)
        _positive("keep_checkpoints", self.keep_checkpoints)

    def check_complete(self) -> None:
        """Raise ValueError unless the fields a run needs are set (after merging)."""
        if self.data.path is None:
            raise ValueError("data.path is not set: pass --data DATASET")
        if self.out is None:
            raise ValueError("out is not set: pass --out RUN")

    def to_dict(self) -> dict[str, Any]:
        """Plain nested dict (paths as strings, unset fields left out; credentials in a
        dataset URL redacted, since this goes to config.toml and checkpoints)."""
        data = _plain(dataclasses.asdict(self))
        if "path" in data.get("data", {}):
            data["data"]["path"] = redact_url(data["data"]["path"])
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainConfig:
        """Build from a nested dict (as :func:`load_toml` returns), rejecting unknown keys."""
        top = {f.name: f for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in data.items():
            if key not in top:
                raise ValueError(f"unknown config key {key!r}; known: {', '.join(top)}")
            sub = _SECTIONS.get(key)
            if sub is not None:
                if not isinstance(value, dict):
                    raise ValueError(f"config [{key}] must be a table, got {value!r}")
                known = {f.name for f in dataclasses.fields(sub)}
                bad = sorted(set(value) - known)
                if bad:
                    raise ValueError(f"unknown key(s) {bad} in [{key}]; known: {', '.join(sorted(known))}")
                kwargs[key] = sub(**value)
            else:
                kwargs[key] = value
        return cls(**kwargs)


_SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "optim": OptimConfig,
    "augment": AugmentConfig,
    "parallel": ParallelConfig,
    "eval": EvalConfig,
}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """``base`` updated by ``override``, tables merged key by key (neither is modified)."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def load_toml(path: Path | str) -> dict[str, Any]:
    """Parse a TOML config file into a nested dict (validated later by ``from_dict``).

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not valid TOML (the message names the file and the parser's reason).
    """
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))  # TOML is UTF-8 by definition
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"{path}: invalid TOML ({exc})") from exc


def dump_toml(config: TrainConfig) -> str:
    """The config as TOML text that :func:`load_toml` + ``from_dict`` read back equal.

    Unset (None) fields are left out, so they come back as their defaults (None).
    """
    # tomli-w escapes every control character in strings (a path may hold any of them).
    return tomli_w.dumps(config.to_dict())
