"""Mixed precision: the autocast context, the gradient scaler, and whether this CPU computes
in bf16 natively.

Mixed precision in this project is ``torch.autocast``, under DDP and FSDP alike: parameters,
BatchNorm statistics and optimizer state stay float32.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from train.config import AMP_CHOICES, Amp
from train.distributed.group import is_distributed

__all__ = ["AMP_DTYPES", "autocast_context", "check_amp", "cpu_flags", "make_grad_scaler", "slow_amp_warning"]

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
"""The torch dtype of each ``--amp`` choice but ``none``."""


def check_amp(amp: str) -> None:
    """Raise ValueError unless ``amp`` is one of the ``--amp`` choices."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")


def autocast_context(amp: Amp, device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """The forward pass's mixed-precision context: ``torch.autocast`` or a null context.

    Mixed precision in this project is autocast, under DDP and FSDP alike: parameters,
    BatchNorm statistics and optimizer state stay float32 and convolutions run in
    ``amp``'s dtype. Run the loss outside it or in float32.

    Args:
        amp: ``bf16``, ``fp16`` or ``none``.
        device: The compute device (its type picks the autocast backend).
    """
    check_amp(amp)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=AMP_DTYPES[amp])


NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})
"""CPU flags (``/proc/cpuinfo``) of x86 instructions that compute in bf16."""


def cpu_flags() -> frozenset[str] | None:
    """This CPU's feature flags, from ``/proc/cpuinfo``; None where there is no such file."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def slow_amp_warning(amp: Amp, device: torch.device, flags: frozenset[str] | None = None) -> str | None:
    """The log line for an autocast that runs far slower than float32 here, else None.

    bf16 autocast on an x86 CPU without bf16 instructions is emulated, about ten times slower
    than float32.

    Args:
        amp: ``bf16``, ``fp16`` or ``none``.
        device: The compute device.
        flags: The CPU's flags (default: :func:`cpu_flags`); None where they cannot be read.
    """
    if amp != "bf16" or device.type != "cpu":
        return None
    flags = cpu_flags() if flags is None else flags
    if flags is None or "avx2" not in flags or flags & NATIVE_BF16_FLAGS:
        return None  # not an x86 CPU we can judge, or one that has the instructions
    return ("--amp bf16 on a CPU without bf16 instructions (no avx512_bf16 or amx_bf16): autocast is "
            "emulated and runs about 10x slower than --amp none here")


def make_grad_scaler(
    amp: Amp, device: torch.device, *, sharded: bool = False
) -> torch.amp.GradScaler:
    """A gradient scaler, enabled only for ``fp16`` (bf16 and fp32 need none).

    A disabled scaler passes through (``scale(loss)`` is ``loss``, ``step`` is
    ``optimizer.step()``), so a training step can use it unconditionally.

    Args:
        amp: ``bf16``, ``fp16`` or ``none``.
        device: The compute device.
        sharded: The model is FSDP-sharded: use ``ShardedGradScaler``, which agrees on
            overflow across ranks (each rank only sees its own gradient shards).
    """
    check_amp(amp)
    enabled = amp == "fp16"
    if sharded and enabled and is_distributed():
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=True)
    return torch.amp.GradScaler(device.type, enabled=enabled)
