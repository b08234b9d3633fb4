"""Reading initial weights: this project's files, plain state_dicts and ultralytics
checkpoints, with a full unpickle only when the user trusts the file."""

from __future__ import annotations

import logging
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from train.models.yolo import load_ultralytics

__all__ = ["load_detector_weights", "read_weights"]

log = logging.getLogger(__name__)

_STRIP_PREFIXES = ("module.", "_orig_mod.", "_fsdp_wrapped_module.")


def _extract_state_dict(ckpt: Any) -> dict[str, torch.Tensor]:
    """The state_dict inside a checkpoint: a bare state_dict, or under ``ema``/``model``/
    ``state_dict`` (an ``nn.Module``, as ultralytics saves, or a state_dict)."""
    if isinstance(ckpt, nn.Module):
        return ckpt.float().state_dict()
    if not isinstance(ckpt, Mapping):
        raise ValueError(f"checkpoint holds a {type(ckpt).__name__}, not a state_dict or a model")
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        return dict(ckpt)
    for key in ("ema", "model", "state_dict"):
        inner = ckpt.get(key)
        if inner is not None:
            return _extract_state_dict(inner)
    raise ValueError(f"checkpoint has no state_dict (keys: {sorted(map(str, ckpt))[:10]})")


def read_weights(path: Path | str, *, trust_pickle: bool = False) -> Any:
    """Read a weights file: ``torch.load`` with ``weights_only=True``, and a full unpickle
    (which can run code from the file) only if trusted.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: The file pickles objects besides tensors and ``trust_pickle`` is False.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights not found: {path}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if not trust_pickle:
            raise ValueError(
                f"{path} holds pickled objects besides tensors (an ultralytics .pt does); "
                "refusing to unpickle it. Pass --trust-weights (trust_pickle=True from Python) "
                "if you trust the file, or save model.state_dict() instead."
            ) from err
        log.warning("loading %s with a full unpickle (--trust-weights)", path)
        load_ultralytics()  # its classes must be importable, with the environment pinned
        return torch.load(path, map_location="cpu", weights_only=False)


def load_detector_weights(
    model: nn.Module, weights: Path | str, *, trust_pickle: bool = False
) -> tuple[list[str], list[str]]:
    """Load a checkpoint into a detector built by :func:`build_detector`, leniently.

    Accepts a ``state_dict`` file, or a dict holding one (or an ``nn.Module``) under
    ``ema``, ``model`` or ``state_dict`` (ultralytics checkpoints, this project's
    trainer). Wrapper prefixes (``module.``, ``_orig_mod.``) are removed. A 3-channel
    first convolution (COCO-pretrained weights) is adapted to one channel by summing over
    its input channels, which gives the same response to a grey image replicated three
    times. Tensors whose shapes still differ (the 80-class head) are skipped. Missing,
    unexpected and skipped keys are logged.

    Args:
        model: The detector to load into (in place).
        weights: Checkpoint path.
        trust_pickle: See :func:`build_detector`.

    Returns:
        The missing keys (left at their initial values) and the unexpected or skipped
        keys of the checkpoint.

    Raises:
        FileNotFoundError: ``weights`` does not exist.
        ValueError: No state_dict in the file, nothing in it matches the model, or a
            pickled checkpoint without ``trust_pickle``.
    """
    state = _extract_state_dict(read_weights(weights, trust_pickle=trust_pickle))
    own = model.state_dict()
    adapted: dict[str, torch.Tensor] = {}
    skipped: list[str] = []
    for key, value in state.items():
        for prefix in _STRIP_PREFIXES:
            key = key.removeprefix(prefix)
        target = own.get(key)
        if target is None:
            skipped.append(key)
            continue
        value = value.to(dtype=target.dtype) if value.is_floating_point() else value
        if (
            value.ndim == 4
            and target.ndim == 4
            and value.shape[1] != target.shape[1]
            and target.shape[1] == 1
            and value.shape[0] == target.shape[0]
        ):
            log.info("%s: summing %d input channels into 1", key, value.shape[1])
            value = value.sum(dim=1, keepdim=True)
        if value.shape != target.shape:
            log.info("%s: skipped, shape %s != %s", key, tuple(value.shape), tuple(target.shape))
            skipped.append(key)
            continue
        adapted[key] = value
    if not adapted:
        raise ValueError(f"no tensor in {weights} matches the {type(model).__name__}'s keys")
    result = model.load_state_dict(adapted, strict=False)
    missing = list(result.missing_keys)
    log.info(
        "loaded %d/%d tensors from %s (%d missing, %d unexpected or skipped)",
        len(adapted), len(own), weights, len(missing), len(skipped),
    )
    if missing:
        log.warning("missing keys (left as initialised): %s", _short(missing))
    if skipped:
        log.warning("unexpected or skipped checkpoint keys: %s", _short(skipped))
    return missing, skipped


def _short(keys: Sequence[str], limit: int = 12) -> str:
    """A log-sized listing of ``keys``."""
    head = ", ".join(keys[:limit])
    return head + (f", ... (+{len(keys) - limit})" if len(keys) > limit else "")
