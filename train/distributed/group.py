"""The process group: joining the job (:func:`init_distributed`), leaving it
(:func:`destroy`), this process's rank, and the few collectives the trainer uses. Every helper
is a no-op without a process group (a single process)."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from train.distributed.launch import LaunchSpec, detect_launch

__all__ = [
    "DistEnv",
    "RestartUnsafeError",
    "all_gather_object",
    "all_reduce_sum",
    "attempt_store",
    "barrier",
    "broadcast_buffers",
    "destroy",
    "init_distributed",
    "is_distributed",
    "is_main",
]

log = logging.getLogger(__name__)


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
