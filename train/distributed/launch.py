"""Where this process sits in the job, read from the environment a launcher set.

Three ways to start (see :func:`detect_launch`):

* **torchrun** (or any launcher that sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
  ``MASTER_ADDR``, ``MASTER_PORT``),
* **srun**, one task per GPU: ``SLURM_PROCID``, ``SLURM_STEP_NUM_TASKS`` (or
  ``SLURM_NTASKS``), ``SLURM_LOCALID``; the rendezvous host is the first node of the
  step's node list (``scontrol show hostnames``), the port derived from the job id,
* **single process**: nothing set.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

__all__ = ["SLURM_PORT_BASE", "SLURM_PORT_SPAN", "LaunchSpec", "detect_launch", "first_host"]

log = logging.getLogger(__name__)

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
