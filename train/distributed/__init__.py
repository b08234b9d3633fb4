"""Everything that touches ``torch.distributed``: rank environment, process group, DDP / FSDP2
wrapping, collectives and mixed precision. Nothing else in the project imports
``torch.distributed`` for these; models stay ignorant of it and hand their main blocks to
:func:`parallelize`.

* :mod:`train.distributed.launch`: where this process sits in the job (torchrun, srun or a
  single process), read from the environment.
* :mod:`train.distributed.group`: joining and leaving the process group, the rank, collectives.
* :mod:`train.distributed.parallelize`: DDP, or FSDP2 one block at a time.
* :mod:`train.distributed.precision`: autocast, the gradient scaler, bf16 on this CPU.

Backends: NCCL on CUDA, gloo on CPU. Without a process group every helper is a no-op.
"""

from __future__ import annotations

from train.distributed.group import (
    DistEnv,
    RestartUnsafeError,
    all_gather_object,
    all_reduce_sum,
    attempt_store,
    barrier,
    broadcast_buffers,
    destroy,
    init_distributed,
    is_distributed,
    is_main,
)
from train.distributed.launch import SLURM_PORT_BASE, SLURM_PORT_SPAN, LaunchSpec, detect_launch, first_host
from train.distributed.parallelize import parallelize
from train.distributed.precision import autocast_context, cpu_flags, make_grad_scaler, slow_amp_warning

__all__ = [
    "SLURM_PORT_BASE",
    "SLURM_PORT_SPAN",
    "DistEnv",
    "LaunchSpec",
    "RestartUnsafeError",
    "all_gather_object",
    "all_reduce_sum",
    "attempt_store",
    "autocast_context",
    "barrier",
    "broadcast_buffers",
    "cpu_flags",
    "destroy",
    "detect_launch",
    "first_host",
    "init_distributed",
    "is_distributed",
    "is_main",
    "make_grad_scaler",
    "parallelize",
    "slow_amp_warning",
]
