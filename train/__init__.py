"""Streaming distributed training on the ingested shards.

Modules, one per stage:

* :mod:`train.config`: ``TrainConfig`` and its component configs, TOML in and out.
* :mod:`train.plan`: the sample order of an epoch, a pure function of (seed, epoch, step)
  (every seed derived in :mod:`shards.seeds`).
* :mod:`train.data`: the streaming loader: each shard's samples read into their batch rows and
  checked, lanes split among ranks and workers.
* :mod:`train.batches`: ``HostBatch`` (reused host memory) and ``DeviceBatch``, ``to_device``.
* :mod:`train.augment`: seeded augmentation of images and boxes, in torch ops on the device.
* :mod:`train.models`: the CNN classifier, the YOLOv8 detector and reading their weights (no ``torch.distributed``).
* :mod:`train.distributed`: rank environment, process groups, DDP / FSDP2, mixed precision.
* :mod:`train.tasks`: the ``Task`` interface, everything the classifier and the detector differ
  in (building the network, loss terms, eval records and metrics, prediction CSV rows).
* :mod:`train.state`: what a run holds (``Run``), the loss guard, the metrics writer.
* :mod:`train.build`: ``build_run`` (dataset, loaders, model, optimizer, resume), ``build_model``.
* :mod:`train.loop`: ``train``, ``train_step``, ``evaluate``, checkpoint and export calls.
* :mod:`train.checkpoint`: DCP checkpoints and the single-file export.
* :mod:`train.metrics`: classifier and detector metrics (numpy).
* entry points: ``python -m train``, ``train.predict``, ``train.report``, ``train.bench``.

The names below are imported lazily, so ``import train.metrics`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "TrainConfig": "train.config",
    "DataConfig": "train.config",
    "ModelConfig": "train.config",
    "OptimConfig": "train.config",
    "AugmentConfig": "train.config",
    "ParallelConfig": "train.config",
    "EvalConfig": "train.config",
    "load_toml": "train.config",
    "dump_toml": "train.config",
    "ShardLoader": "train.data",
    "EpochPlan": "train.plan",
    "plan_epoch": "train.plan",
    "read_split": "train.data",
    "to_device": "train.data",
    "augment": "train.augment",
    "step_params": "train.augment",
    "build_run": "train.build",
    "train": "train.loop",
    "train_step": "train.loop",
    "evaluate": "train.loop",
    "NonFiniteLossError": "train.state",
    "save_checkpoint": "train.checkpoint",
    "load_checkpoint": "train.checkpoint",
    "export_model": "train.checkpoint",
    "load_export": "train.checkpoint",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'train' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
