"""Checkpoints: sharded ``torch.distributed.checkpoint`` for resuming, one file for inference.

Layout in the run folder::

    RUN/checkpoints/step-00000120/   a DCP checkpoint (each rank writes its shards)
    RUN/checkpoints/latest           name of the newest complete checkpoint (written last)
    RUN/model.pt                     full weights + config, for ``python -m train.predict``

A checkpoint holds the model and optimizer (through ``torch.distributed.checkpoint
.state_dict``, so DDP, FSDP2 and a plain module save the same keys), the learning-rate
scheduler, the gradient scaler and the training position (step, epoch) from which the
loader position follows. DCP re-shards on load, so a run saved on N ranks resumes on M.
``latest`` is replaced only after every rank finished writing, so a run killed while
saving resumes from the previous checkpoint. A save that fails (a full disk, a quota) removes
what it wrote, leaves ``latest`` on the last good checkpoint and raises
:class:`CheckpointWriteError`, whose one line says so.

``model.pt`` holds only tensors and plain Python values: ``torch.load(...,
weights_only=True)`` reads it.
"""

from __future__ import annotations

import logging
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from shards.atomic import atomic_write, atomic_write_text
from shards.diskspace import free_bytes, human
from train.distributed import barrier, is_distributed, is_main

__all__ = [
    "CHECKPOINT_DIR",
    "CheckpointWriteError",
    "EXPORT_FORMAT",
    "EXPORT_NAME",
    "export_model",
    "latest_checkpoint",
    "load_checkpoint",
    "load_export",
    "save_checkpoint",
]

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
EXPORT_NAME = "model.pt"
EXPORT_FORMAT = "pneumo-hpc-model/1"


class CheckpointWriteError(RuntimeError):
    """A checkpoint or ``model.pt`` could not be written; the last good checkpoint is kept."""


def _failure(exc: BaseException) -> str:
    """The first rank's error of a failed DCP save (``CheckpointException``), or ``exc``, in one line."""
    failures = getattr(exc, "failures", None)
    rank = ""
    if isinstance(failures, dict) and failures:
        r, got = next(iter(sorted(failures.items())))
        rank, exc = f"rank {r}: ", got[0] if isinstance(got, tuple) else got
    text = str(exc).strip().splitlines()
    return f"{rank}{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _write_failed(what: Path, exc: BaseException, kept: Path | None) -> CheckpointWriteError:
    room = f"{human(free_bytes(what))} free on its filesystem"
    if kept is not None:
        room += f", the last one took {human(sum(p.stat().st_size for p in kept.rglob('*') if p.is_file()))}"
    keep = f"the last good checkpoint {kept.name} is kept" if kept else "there is no earlier checkpoint"
    return CheckpointWriteError(f"{what.name} could not be written ({_failure(exc)}; {room}); {keep}: "
                                "free space, then run the same command with --resume")


def latest_checkpoint(run_dir: Path | str) -> Path | None:
    """The newest complete checkpoint of a run, or None."""
    pointer = Path(run_dir) / CHECKPOINT_DIR / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{pointer} names {path.name}, which has no DCP .metadata")
    return path


def _latest_or_none(run_dir: Path | str) -> Path | None:
    try:
        return latest_checkpoint(run_dir)
    except (OSError, ValueError):
        return None


def _state(model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
           scaler: Any, train_state: dict[str, Any]) -> dict[str, Any]:
    return {
        "model": get_model_state_dict(model),
        "optim": get_optimizer_state_dict(model, optimizer),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "train": dict(train_state),
    }


def save_checkpoint(run_dir: Path | str, *, step: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any,
                    train_state: dict[str, Any], keep: int = 2) -> Path:
    """Save a DCP checkpoint (collective: every rank calls it) and point ``latest`` at it.

    Args:
        run_dir: The run folder.
        step: Optimizer steps done (names the folder).
        model, optimizer, scheduler, scaler: What to save.
        train_state: Plain values: step, epoch and the settings a resume must match.
        keep: Checkpoints kept; older ones are deleted by rank 0.

    Returns:
        The checkpoint folder.
    """
    root = Path(run_dir) / CHECKPOINT_DIR
    path = root / f"step-{step:08d}"
    if is_main():
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(path, ignore_errors=True)  # a partial save of an earlier attempt
    barrier()
    state = _state(model, optimizer, scheduler, scaler, train_state)
    try:
        with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
            warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
            dcp.save(state, checkpoint_id=path, no_dist=not is_distributed())
    except (CheckpointException, Exception) as exc:  # CheckpointException is a BaseException
        # Every rank hears of a failed save (DCP gathers the ranks' results): none waits at a barrier.
        if is_main():
            shutil.rmtree(path, ignore_errors=True)
        raise _write_failed(path, exc, _latest_or_none(run_dir)) from exc
    barrier()
    if is_main():
        try:
            atomic_write_text(root / LATEST, path.name + "\n")
        except OSError as exc:
            shutil.rmtree(path, ignore_errors=True)
            raise _write_failed(path, exc, _latest_or_none(run_dir)) from exc
        old = sorted(p for p in root.glob("step-*") if p.is_dir() and p != path)
        for stale in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
        log.info("checkpoint %s", path)
    return path


def load_checkpoint(path: Path | str, *, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: Any) -> dict[str, Any]:
    """Restore a checkpoint in place (collective); return its training state.

    The model and optimizer may be wrapped differently and sharded over a different
    number of ranks than when saved.
    """
    path = Path(path)
    state = _state(model, optimizer, scheduler, scaler, {})
    # The training state's keys are not known before reading: take them from the metadata.
    meta = dcp.FileSystemReader(str(path)).read_metadata()
    state["train"] = {k.split(".", 1)[1]: None for k in meta.state_dict_metadata if k.startswith("train.")}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*single process", category=UserWarning)
        dcp.load(state, checkpoint_id=path, no_dist=not is_distributed())
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optim"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    log.info("resumed from %s (step %s)", path, state["train"].get("step"))
    return state["train"]


def export_model(path: Path | str, model: nn.Module, info: dict[str, Any]) -> Path | None:
    """Write the full, unsharded weights plus ``info`` as one file (collective).

    Every rank takes part in gathering the weights; rank 0 writes ``path`` (through a
    temporary name). ``info`` must hold plain values (task, architecture, sizes, the
    resolved config).

    Returns:
        ``path`` on rank 0, None elsewhere.
    """
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not is_main():
        return None
    path = Path(path)
    try:
        with atomic_write(path) as f:
            torch.save({"format": EXPORT_FORMAT, **info, "state_dict": state}, f)
    except (OSError, RuntimeError) as exc:  # torch.save reports a short write as a RuntimeError
        raise _write_failed(path, exc, _latest_or_none(path.parent)) from exc
    log.info("exported %s", path)
    return path


def load_export(path: Path | str) -> dict[str, Any]:
    """Read a ``model.pt`` written by :func:`export_model` (no code-executing unpickle).

    ``path`` may be the file or the run folder holding it.

    Raises:
        FileNotFoundError: No such file.
        ValueError: Not a model exported by this project.
    """
    path = Path(path)
    if path.is_dir():
        path = path / EXPORT_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no exported model at {path} (a finished run writes RUN/{EXPORT_NAME})")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{path} is not a {EXPORT_FORMAT} file")
    return data
