"""Everything that touches ``torch.distributed``: rank environment, process group,
DDP / FSDP2 wrapping, collectives and mixed-precision helpers.

Three ways to start, detected from the environment (see :func:`detect_launch`):

* **torchrun** (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``),
* **srun**, one task per GPU: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (or
  ``SLURM_NTASKS``), ``SLURM_LOCALID``; the rendezvous host is the first node of the
  step's node list (``scontrol show hostnames``), the port derived from the job id,
* **single process**: no process group at all; every helper here degrades to a no-op.

Backends: NCCL on CUDA, gloo on CPU. Models stay ignorant of all this; they hand their
main blocks to :func:`parallelize`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from train.config import AMP_CHOICES, STRATEGIES, Amp, Strategy

__all__ = [
    "DistEnv",
    "LaunchSpec",
    "RestartUnsafeError",
    "all_gather_object",
    "all_reduce_sum",
    "attempt_store",
    "autocast_context",
    "barrier",
    "broadcast_buffers",
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

log = logging.getLogger(__name__)

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

#: Slurm-derived rendezvous ports: ``base + job_id % span``, below Linux's ephemeral range.
SLURM_PORT_BASE = 10000
SLURM_PORT_SPAN = 20000


@dataclass(frozen=True, kw_only=True)
class LaunchSpec:
    """Where this process sits in the job, as read from the environment."""

    rank: int
    """Global rank, 0 .. world_size - 1."""
    world_size: int
    """Number of processes in the job."""
    local_rank: int
    """Rank on this node; selects the GPU."""
    master_addr: str | None
    """Rendezvous host (None when single-process)."""
    master_port: int | None
    """Rendezvous port (None when single-process)."""
    launcher: Literal["torchrun", "slurm", "single"]
    """What started the process."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {self.world_size}")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank must be in [0, {self.world_size}), got {self.rank}")
        if self.local_rank < 0:
            raise ValueError(f"local_rank must be >= 0, got {self.local_rank}")


@dataclass(frozen=True, kw_only=True)
class DistEnv:
    """The process's place in the job and the device it computes on."""

    rank: int
    """Global rank (0 when single-process)."""
    world_size: int
    """Number of processes (1 when single-process)."""
    local_rank: int
    """Rank on this node."""
    device: torch.device
    """``cuda:<local_rank>`` when CUDA is available, else ``cpu``."""
    backend: str | None
    """``nccl`` or ``gloo``; None when there is no process group."""
    launcher: str = "single"
    """``torchrun``, ``slurm`` or ``single``."""

    @property
    def distributed(self) -> bool:
        """Whether a process group exists (world size above 1)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that logs, evaluates and writes)."""
        return self.rank == 0


def _env_int(environ: Mapping[str, str], name: str) -> int:
    value = environ.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an int, got {value!r}") from None


def first_host(nodelist: str) -> str:
    """First host name of a Slurm node list, via ``scontrol show hostnames``.

    Falls back to parsing the compressed form (``gpu[003-005,010],cpu01`` -> ``gpu003``)
    when ``scontrol`` is not on the path.
    """
    try:
        out = subprocess.run(
            ["scontrol", "show", "hostnames", nodelist],
            check=True, capture_output=True, text=True, timeout=30,
        ).stdout.split()
        if out:
            return out[0]
    except (FileNotFoundError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        log.debug("scontrol unavailable (%s); parsing the node list %r", err, nodelist)
    return _parse_first_host(nodelist)


def _parse_first_host(nodelist: str) -> str:
    """First host of a compressed Slurm node list, without ``scontrol``."""
    text = nodelist.strip()
    depth, end = 0, len(text)
    for i, ch in enumerate(text):  # first comma outside brackets ends the first group
        depth += ch == "["
        depth -= ch == "]"
        if ch == "," and depth == 0:
            end = i
            break
    group = text[:end]
    match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", group)
    if not group or (match is None and "[" in group):
        raise ValueError(f"cannot parse the Slurm node list {nodelist!r}")
    if match is None:
        return group
    prefix, ranges, suffix = match.groups()
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}{suffix}"


def detect_launch(environ: Mapping[str, str] | None = None) -> LaunchSpec:
    """Read this process's rank and rendezvous from the environment.

    torchrun variables win over Slurm ones (torchrun inside an allocation). Slurm counts
    only inside an ``srun`` step (``SLURM_STEP_NUM_TASKS`` set or ``SLURM_STEP_ID``
    set): a batch script's own ``SLURM_NTASKS`` describes the allocation, not this process,
    and trusting it would leave rank 0 waiting for peers that never start.
    ``MASTER_ADDR`` / ``MASTER_PORT`` already in the environment are kept.

    Args:
        environ: The environment to read (default ``os.environ``).

    Returns:
        The launch description (``launcher="single"`` when nothing is set).

    Raises:
        ValueError: Malformed or inconsistent variables.
    """
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = _env_int(env, "WORLD_SIZE")
        return LaunchSpec(
            rank=_env_int(env, "RANK"),
            world_size=world,
            local_rank=_env_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1" if world == 1 else None),
            master_port=int(env["MASTER_PORT"]) if env.get("MASTER_PORT") else None,
            launcher="torchrun",
        )
    in_step = "SLURM_STEP_NUM_TASKS" in env or "SLURM_STEP_ID" in env
    if "SLURM_PROCID" in env and in_step:
        tasks_var = "SLURM_STEP_NUM_TASKS" if "SLURM_STEP_NUM_TASKS" in env else "SLURM_NTASKS"
        world = _env_int(env, tasks_var)
        addr = env.get("MASTER_ADDR")
        if addr is None and world > 1:
            nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
            if not nodelist:
                raise ValueError("srun step without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST")
            addr = first_host(nodelist)
        if env.get("MASTER_PORT"):
            port: int | None = _env_int(env, "MASTER_PORT")
        elif "SLURM_JOB_ID" in env:
            port = SLURM_PORT_BASE + _env_int(env, "SLURM_JOB_ID") % SLURM_PORT_SPAN
        else:
            port = None
        return LaunchSpec(
            rank=_env_int(env, "SLURM_PROCID"),
            world_size=world,
            local_rank=_env_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=addr,
            master_port=port,
            launcher="slurm",
        )
    return LaunchSpec(
        rank=0, world_size=1, local_rank=0, master_addr=None, master_port=None, launcher="single"
    )


class RestartUnsafeError(RuntimeError):
    """A torchrun launch whose restarts cannot be told apart in the rendezvous store."""


def attempt_store(launch: LaunchSpec, timeout: timedelta,
                  environ: Mapping[str, str] | None = None) -> dist.Store | None:
    """The store this launch attempt's process group meets in; None lets ``env://`` make one.

    Under torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) every rank is a client of the
    store the elastic agent hosts at ``MASTER_ADDR:MASTER_PORT``, and the agent keeps that
    store across ``--max-restarts`` restarts (the static rendezvous creates it once, the c10d
    one shares its own). ``env://`` adds no key prefix per attempt, so a restarted group would
    rendezvous on the very keys that hold the killed group's gloo (or NCCL) addresses: a rank
    that reads a peer's key before the new peer rewrites it connects to a dead process, and is
    refused, reset, or never answered while the dead rank's DataLoader workers still hold its
    listening socket. Each attempt therefore meets under its own key prefix,
    ``TORCHELASTIC_RESTART_COUNT``.

    That count is the same on every rank only when one agent started them all (one node):
    agents on different nodes count their restarts apart. Several nodes with restarts must give
    every rendezvous round a new store (``--rdzv-backend c10d`` and
    ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``, as ``jobs/train.sbatch`` does).

    Args:
        launch: From :func:`detect_launch`.
        timeout: How long a store operation may wait.
        environ: The environment to read (default ``os.environ``).

    Returns:
        A prefixed client of the agent's store, or None outside torchrun's agent store.

    Raises:
        RestartUnsafeError: Several agents sharing one store with ``--max-restarts`` > 0.
    """
    env = os.environ if environ is None else environ
    if launch.launcher != "torchrun" or env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    nodes = int(env.get("GROUP_WORLD_SIZE", "1"))
    restarts = int(env.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if nodes > 1 and restarts > 0:
        raise RestartUnsafeError(
            f"torchrun on {nodes} nodes with --max-restarts {restarts} keeps one rendezvous "
            "store across restarts and each node counts its restarts apart, so a restarted "
            "group could meet the killed one's addresses: use --rdzv-backend c10d with "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 (jobs/train.sbatch does)"
        )
    if launch.master_addr is None or launch.master_port is None:
        raise RuntimeError("torchrun set TORCHELASTIC_USE_AGENT_STORE but no MASTER_ADDR/MASTER_PORT")
    attempt = int(env.get("TORCHELASTIC_RESTART_COUNT", "0"))
    client = dist.TCPStore(launch.master_addr, launch.master_port, launch.world_size,
                           is_master=False, timeout=timeout)
    return dist.PrefixStore(f"pneumo/attempt-{attempt}", client)


def init_distributed(timeout_s: float = 1800.0, *, backend: str | None = None) -> DistEnv:
    """Join the job: pick the device and, with more than one process, create the group.

    With a world size of 1 (plain ``python``, or a launcher with one process) no process
    group is created and all helpers here are no-ops. With CUDA, rank ``r`` uses
    ``cuda:<local_rank>``.

    Args:
        timeout_s: Collective timeout; a rank stuck longer fails instead of hanging.
        backend: Override the backend (default ``nccl`` on CUDA, ``gloo`` on CPU).

    Returns:
        The process's :class:`DistEnv`.

    Raises:
        ValueError: Bad environment, timeout or backend.
        RuntimeError: Rendezvous address or port unknown.
        RestartUnsafeError: See :func:`attempt_store`.
    """
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be > 0, got {timeout_s}")
    launch = detect_launch()
    if torch.cuda.is_available():
        device = torch.device("cuda", launch.local_rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if launch.world_size == 1:
        log.info("single process on %s (%s); no process group", device, launch.launcher)
        return DistEnv(rank=0, world_size=1, local_rank=launch.local_rank, device=device,
                       backend=None, launcher=launch.launcher)

    chosen = backend or ("nccl" if device.type == "cuda" else "gloo")
    if chosen not in ("nccl", "gloo"):
        raise ValueError(f"backend must be 'nccl' or 'gloo', got {chosen!r}")
    if launch.master_addr is None or launch.master_port is None:
        raise RuntimeError(
            f"{launch.launcher}: world size {launch.world_size} but no MASTER_ADDR/MASTER_PORT"
        )
    # env:// reads these; torchrun sets them already, srun does not.
    os.environ["MASTER_ADDR"] = launch.master_addr
    os.environ["MASTER_PORT"] = str(launch.master_port)
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT") or 0):
        log.info("torchrun restart %s of at most %s: the ranks were started again",
                    os.environ["TORCHELASTIC_RESTART_COUNT"], os.environ.get("TORCHELASTIC_MAX_RESTARTS"))
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s)
        store = attempt_store(launch, timeout)
        dist.init_process_group(
            backend=chosen,
            init_method=None if store is not None else "env://",
            store=store,
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timeout,
            device_id=device if chosen == "nccl" else None,
        )
    log.info(
        "rank %d/%d (local %d) on %s, %s via %s at %s:%d",
        launch.rank, launch.world_size, launch.local_rank, device, chosen, launch.launcher,
        launch.master_addr, launch.master_port,
    )
    return DistEnv(rank=launch.rank, world_size=launch.world_size, local_rank=launch.local_rank,
                   device=device, backend=chosen, launcher=launch.launcher)


def destroy() -> None:
    """Destroy the process group, if any (call in the entry point's ``finally``)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def is_distributed() -> bool:
    """Whether this process is in a process group of more than one rank (the collectives
    here are no-ops otherwise)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def is_main() -> bool:
    """Whether this process is rank 0 (always true without a process group)."""
    return not is_distributed() or dist.get_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks, in place; returns it (unchanged when single-process)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order: ``[obj]`` when single-process.

    Pickles over the network: use it for small things (metrics, per-rank prediction
    lists), never for shard content.
    """
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BatchNorm running statistics) to every rank.

    DDP does this at each forward; FSDP2 never does, so without SyncBatchNorm (CPU) each
    rank's running statistics drift apart. Call it before evaluation or checkpointing
    under FSDP. No-op without a process group.
    """
    if not is_distributed():
        return
    for buf in model.buffers():
        dist.broadcast(buf, src=src)


def _check_amp(amp: str) -> None:
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
    _check_amp(amp)
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=_AMP_DTYPES[amp])


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
    _check_amp(amp)
    enabled = amp == "fp16"
    if sharded and enabled and is_distributed():
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        return ShardedGradScaler(device.type, enabled=True)
    return torch.amp.GradScaler(device.type, enabled=enabled)


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
    _check_amp(amp)
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
        policy = MixedPrecisionPolicy(param_dtype=_AMP_DTYPES[amp], reduce_dtype=torch.float32)
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
