"""Wrapping a model for data-parallel training: DDP, or FSDP2 one block at a time."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from train.config import STRATEGIES, Amp, Strategy
from train.distributed.group import DistEnv
from train.distributed.precision import AMP_DTYPES, check_amp

__all__ = ["parallelize"]

log = logging.getLogger(__name__)


def _batchnorms(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm))


def parallelize(
    model: nn.Module,
    env: DistEnv,
    *,
    strategy: Strategy,
    blocks: Iterable[nn.Module] = (),
    amp: Amp = "none",
    sync_batchnorm: bool = True,
    low_precision_params: bool = False,
    find_unused_parameters: bool = False,
) -> nn.Module:
    """Move ``model`` to the device and wrap it for data-parallel training.

    * ``ddp``: ``DistributedDataParallel`` (buffers broadcast from rank 0 each forward).
    * ``fsdp``: FSDP2, ``fully_shard`` on each of ``blocks`` that has parameters, then on
      the root. Every rank must hold identical initial weights (same seed, or load a
      checkpoint afterwards): FSDP2 shards the local tensors without a broadcast.

    BatchNorm and precision: mixed precision is ``torch.autocast``
    (:func:`autocast_context`); parameters are kept and gathered in float32. An FSDP2
    ``MixedPrecisionPolicy`` with a bf16 ``param_dtype`` breaks BatchNorm (its weight is
    cast to bf16 while its running statistics stay float32: "expected scalar type
    BFloat16 but found Float"). With ``low_precision_params=True`` (FSDP only, amp on)
    the blocks' parameters are gathered in the amp dtype, halving all-gather traffic,
    and every BatchNorm gets its own FSDP unit with a float32 policy; the forward must
    then run under :func:`autocast_context` (the convolution after a float32 BatchNorm
    needs autocast to take its float32 output). Gradients are reduced in float32.

    On CUDA with ``sync_batchnorm``, BatchNorm becomes SyncBatchNorm (statistics over the
    global batch). On CPU it is left alone: DDP keeps rank 0's running statistics, FSDP
    keeps each rank's own; call :func:`broadcast_buffers` before eval or checkpoint.

    Args:
        model: The (unwrapped) model.
        env: From :func:`init_distributed`.
        strategy: ``ddp`` or ``fsdp``.
        blocks: The model's main blocks (``PneumoniaCNN.blocks``,
            ``detector_blocks(model)``), in order; only used by ``fsdp``.
        amp: ``bf16``, ``fp16`` or ``none``.
        sync_batchnorm: Convert BatchNorm to SyncBatchNorm on CUDA.
        low_precision_params: See above.
        find_unused_parameters: Passed to DDP.

    Returns:
        The wrapped model (DDP: a wrapper, the model is ``.module``; FSDP2: the same
        object, its class swapped). Unchanged but moved when single-process.

    Raises:
        ValueError: Unknown strategy or amp; ``low_precision_params`` without fsdp and amp.
        RuntimeError: ``env`` is distributed but the process group is gone.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    check_amp(amp)
    if low_precision_params and (strategy != "fsdp" or amp == "none"):
        raise ValueError(
            f"low_precision_params needs strategy='fsdp' and amp on, got {strategy!r}, {amp!r}"
        )
    blocks = list(blocks)
    model = model.to(env.device)
    if not env.distributed:
        log.info("single process: %s not applied", strategy)
        return model
    if not (dist.is_available() and dist.is_initialized()):  # a 1-rank group is fine
        raise RuntimeError(f"{env} says distributed but no process group is initialised")
    if sync_batchnorm and env.device.type == "cuda":
        # Containers are modified in place, so the ``blocks`` references stay valid.
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)

    if strategy == "ddp":
        return nn.parallel.DistributedDataParallel(
            model,
            device_ids=[env.device.index] if env.device.type == "cuda" else None,
            find_unused_parameters=find_unused_parameters,
        )

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    fp32 = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    policy = fp32
    if low_precision_params:
        policy = MixedPrecisionPolicy(param_dtype=AMP_DTYPES[amp], reduce_dtype=torch.float32)
        for bn in _batchnorms(model):
            fully_shard(bn, mesh=mesh, mp_policy=fp32)
    n_sharded = 0
    for block in blocks:
        if any(True for _ in block.parameters()):  # Upsample, Concat: nothing to shard
            fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=True)
            n_sharded += 1
    fully_shard(model, mesh=mesh, mp_policy=policy)
    log.info(
        "FSDP2 over %d ranks: %d blocks + root, params %s", env.world_size, n_sharded,
        policy.param_dtype,
    )
    return model
