"""The networks: a small CNN classifier and a one-channel, one-class YOLOv8 detector.

Models never touch ``torch.distributed``: they expose their main blocks
(:attr:`PneumoniaCNN.blocks`, :func:`detector_blocks`) and ``train.distributed`` wraps
them (DDP, or FSDP2 one block at a time).

Images arrive as float (B, 1, H, W), already normalised by the data pipeline. Boxes are
``[x1, y1, x2, y2]`` in the pixel frame of the shards (640 x 640).

Ultralytics is imported lazily (only the detector needs it), after its environment is
pinned to offline, no auto-install and a writable settings folder; see
:func:`_ultralytics`. Only ``DetectionModel``, ``v8DetectionLoss``,
``non_max_suppression`` and ``get_cfg`` are used: never its trainer, validator,
predictor, ``YOLO()`` or plotting.
"""

from __future__ import annotations

import logging
import os
import pickle
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from train.config import DETECTORS

__all__ = [
    "ClassifierConfig",
    "DetectionLoss",
    "PneumoniaCNN",
    "build_detector",
    "detector_blocks",
    "load_detector_weights",
    "postprocess_detections",
    "read_weights",
]

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """Shape of :class:`PneumoniaCNN`."""

    in_channels: int = 1
    """Input channels (1: the shards hold grey-level images)."""
    width: int = 32
    """Channels of the stem; each stage doubles them, up to ``max_width``."""
    max_width: int = 256
    """Cap on the channels of any stage."""
    depth: int = 4
    """Number of stages; each halves the resolution (total stride ``2 ** (depth + 1)``)."""
    blocks_per_stage: int = 1
    """Residual blocks after each stage's stride-2 convolution (0: none)."""
    dropout: float = 0.2
    """Dropout probability before the final linear layer, in [0, 1)."""
    prior: float | None = None
    """If set, the logit bias starts at ``log(prior / (1 - prior))`` (e.g. the positive
    rate, about 0.22 on RSNA), so early training does not chase the class imbalance."""

    def __post_init__(self) -> None:
        for name in ("in_channels", "width", "max_width", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_width < self.width:
            raise ValueError(f"max_width must be >= width ({self.width}), got {self.max_width}")
        if not isinstance(self.blocks_per_stage, int) or self.blocks_per_stage < 0:
            raise ValueError(f"blocks_per_stage must be an int >= 0, got {self.blocks_per_stage!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.prior is not None and not 0.0 < self.prior < 1.0:
            raise ValueError(f"prior must be in (0, 1) or None, got {self.prior}")

    def stage_widths(self) -> list[int]:
        """Output channels of each stage."""
        return [min(self.width * 2 ** (i + 1), self.max_width) for i in range(self.depth)]


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> SiLU."""

    def __init__(self, c_in: int, c_out: int, *, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            # Not in place: under FSDP2 a BatchNorm can be its own unit, and an in-place op
            # on a unit's output can bypass the hook that all-gathers it for backward.
            nn.SiLU(),
        )


class ResidualBlock(nn.Module):
    """Two 3x3 ConvBNAct with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(channels, channels)
        self.conv2 = ConvBNAct(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class PneumoniaCNN(nn.Module):
    """Small, fast CNN for pneumonia yes/no on one-channel chest X-rays.

    ``stem`` (stride 2) -> ``blocks`` (one per stage: a stride-2 ConvBNAct then
    ``blocks_per_stage`` residual blocks) -> global average pool -> dropout -> one logit.

    Attributes:
        stem: The first convolution.
        blocks: The stages, in order; the units FSDP2 shards one by one.
        head: Pooling, dropout and the linear layer.
    """

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        cfg = self.config
        self.stem = ConvBNAct(cfg.in_channels, cfg.width, stride=2)
        stages: list[nn.Module] = []
        c_in = cfg.width
        for c_out in cfg.stage_widths():
            layers: list[nn.Module] = [ConvBNAct(c_in, c_out, stride=2)]
            layers += [ResidualBlock(c_out) for _ in range(cfg.blocks_per_stage)]
            stages.append(nn.Sequential(*layers))
            c_in = c_out
        self.blocks = nn.ModuleList(stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(cfg.dropout),
            nn.Linear(c_in, 1),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            # Zero-init the last BN of each residual branch: blocks start as identities.
            if isinstance(m, ResidualBlock):
                nn.init.zeros_(m.conv2[1].weight)
        linear = self.head[-1]
        nn.init.normal_(linear.weight, std=0.01)
        prior = self.config.prior
        nn.init.constant_(linear.bias, 0.0 if prior is None else float(np.log(prior / (1 - prior))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of pneumonia.

        Args:
            x: (B, in_channels, H, W) float, normalised.

        Returns:
            (B,) logits (apply ``sigmoid`` for probabilities).
        """
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected input (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        # sum over the single logit rather than squeeze: a view as a module's output makes
        # FSDP2 warn (an in-place op on it would skip its pre-backward hook).
        return self.head(x).sum(dim=1)


# ---------------------------------------------------------------------------------------
# Detector
# ---------------------------------------------------------------------------------------


def _ultralytics() -> dict[str, Any]:
    """Import the few ultralytics pieces used here, offline and with a writable config.

    The environment must be set before the first ``import ultralytics`` (it reads it at
    import time), hence the lazy import. Existing settings are respected.

    Note that importing ultralytics has process-wide side effects: it calls
    ``cv2.setNumThreads(0)`` and sets numpy and torch print options.
    """
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_AUTOINSTALL", "false")
    os.environ.setdefault("YOLO_VERBOSE", "false")
    if "YOLO_CONFIG_DIR" not in os.environ:
        cfg_dir = Path(tempfile.gettempdir()) / f"pneumo-hpc-ultralytics-{os.getuid()}"
        cfg_dir.mkdir(parents=True, exist_ok=True)
        os.environ["YOLO_CONFIG_DIR"] = str(cfg_dir)
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.loss import v8DetectionLoss
    from ultralytics.utils.nms import non_max_suppression

    return {
        "get_cfg": get_cfg,
        "DetectionModel": DetectionModel,
        "v8DetectionLoss": v8DetectionLoss,
        "non_max_suppression": non_max_suppression,
    }


def build_detector(
    model: str = "yolov8n",
    *,
    weights: Path | str | None = None,
    trust_pickle: bool = False,
) -> nn.Module:
    """A YOLOv8 ``DetectionModel`` for one-channel input and one class (lung opacity).

    Built from the ultralytics ``f"{model}.yaml"`` with ``ch=1, nc=1`` and freshly
    initialised, with ``model.args`` set to the ultralytics defaults (the box/cls/dfl
    loss gains that ``v8DetectionLoss`` reads).

    Args:
        model: One of :data:`DETECTORS`.
        weights: Optional checkpoint to start from; see :func:`load_detector_weights`.
        trust_pickle: Allow a full (code-executing) unpickle for checkpoints that are not
            plain tensors, such as ultralytics ``.pt`` files. Only for files you trust.

    Returns:
        The detector, in train mode, on the CPU, float32.

    Raises:
        ValueError: Unknown model name.
        FileNotFoundError: ``weights`` does not exist.
    """
    if model not in DETECTORS:
        raise ValueError(f"model must be one of {DETECTORS}, got {model!r}")
    ul = _ultralytics()
    net = ul["DetectionModel"](f"{model}.yaml", ch=1, nc=1, verbose=False)
    net.args = ul["get_cfg"]()
    net.names = {0: "opacity"}
    if weights is not None:
        load_detector_weights(net, weights, trust_pickle=trust_pickle)
    return net


def detector_blocks(model: nn.Module) -> list[nn.Module]:
    """The detector's layers (``model.model``), the units to shard one by one under FSDP2.

    Layers without parameters (Upsample, Concat) are included; ``parallelize`` skips them.
    """
    return list(model.model)


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
        _ultralytics()  # its classes must be importable, with the environment pinned
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


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP wrapper (FSDP2 wraps in place, nothing to unwrap)."""
    return getattr(model, "module", model)


class DetectionLoss:
    """The YOLOv8 loss (ultralytics ``v8DetectionLoss``) on this project's targets.

    What it returns: ``total = box + cls + dfl``, each term already multiplied by its
    ultralytics gain (box 7.5, cls 0.5, dfl 1.5 from ``model.args``) and each normalised
    by the batch's total assigned target score (a per-batch mean). Ultralytics'
    own ``__call__`` multiplies this by the batch size (its trainer compensates through a
    nominal batch of 64); this wrapper does *not*, so the loss does not grow with the
    batch size and gradients under DDP/FSDP are the mean over ranks. Consequence: SGD
    learning rates from ultralytics recipes (``lr0=0.01`` at an effective batch of 64)
    correspond to about 64x larger rates here; Adam-type optimisers are unaffected.

    A batch with no boxes at all is fine (only the classification term is non-zero).
    The loss is computed in float32 with autocast disabled, whatever the precision of
    the forward pass: the anchor grid and the DFL decode lose pixels in bfloat16.

    Build it from the unwrapped detector (or a DDP wrapper, which is unwrapped); the
    ultralytics criterion is created lazily for the device the predictions live on.
    """

    def __init__(self, model: nn.Module) -> None:
        """Args:
        model: A detector from :func:`build_detector` (``model.args`` is filled with the
            ultralytics defaults if missing).
        """
        model = _unwrap(model)
        self._ul = _ultralytics()
        if getattr(model, "args", None) is None:
            model.args = self._ul["get_cfg"]()
        self._model = model
        self._criteria: dict[torch.device, Any] = {}

    def _criterion(self, device: torch.device) -> Any:
        crit = self._criteria.get(device)
        if crit is None:
            crit = self._ul["v8DetectionLoss"](self._model)
            # v8DetectionLoss takes its device from the parameters at construction; pin it
            # to where the predictions are (the model may have moved since).
            crit.device = device
            crit.proj = crit.proj.to(device)
            crit.bbox_loss = crit.bbox_loss.to(device)
            self._criteria[device] = crit
        return crit

    def __call__(
        self,
        preds: Mapping[str, Any] | tuple[Any, Mapping[str, Any]],
        targets: Sequence[torch.Tensor | np.ndarray],
        *,
        image_size: int | tuple[int, int] = 640,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the loss.

        Args:
            preds: The train-mode output of the detector (a dict with ``boxes``,
                ``scores``, ``feats``), or an eval-mode ``(decoded, raw)`` tuple.
            targets: Per image, (K, 4) boxes ``[x1, y1, x2, y2]`` in pixels of the frame
                given by ``image_size`` (K may be 0). The network input may be resized
                from that frame: boxes are normalised by ``image_size``, not by the input.
            image_size: The (height, width) of the boxes' pixel frame, or one int for a
                square frame.

        Returns:
            ``(total, {"box": ..., "cls": ..., "dfl": ...})``: ``total`` is a 0-d float32
            tensor for ``backward``; the terms are detached 0-d tensors (no host sync).

        Raises:
            ValueError: ``targets`` does not have one entry per image, or a box tensor is
                not (K, 4).
        """
        raw = preds[1] if isinstance(preds, tuple) else preds
        boxes_out = raw["boxes"]
        device = boxes_out.device
        batch_size = boxes_out.shape[0]
        if len(targets) != batch_size:
            raise ValueError(f"got {len(targets)} target entries for a batch of {batch_size}")
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        batch = _yolo_batch(targets, height=float(h), width=float(w), device=device)
        fp32 = {
            "boxes": boxes_out.float(),
            "scores": raw["scores"].float(),
            "feats": [f.float() for f in raw["feats"]],
        }
        with torch.autocast(device_type=device.type, enabled=False):
            loss_vec, _ = self._criterion(device)(fp32, batch)
        # ultralytics returns the 3 gain-weighted terms times the batch size: undo that.
        terms = loss_vec / batch_size
        detached = terms.detach()
        return terms.sum(), {"box": detached[0], "cls": detached[1], "dfl": detached[2]}


def _yolo_batch(
    targets: Sequence[torch.Tensor | np.ndarray],
    *,
    height: float,
    width: float,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Ultralytics' batch dict: ``batch_idx`` (N,), ``cls`` (N, 1), ``bboxes`` (N, 4)
    normalised centre xywh. Boxes are clipped to the frame; empty ones are dropped (a
    zero box would read as padding to the assigner)."""
    idx, rows = [], []
    for i, t in enumerate(targets):
        b = torch.as_tensor(t).detach().to("cpu", torch.float32)
        if b.numel() == 0:
            b = torch.zeros(0, 4)
        elif b.shape == (4,):
            b = b.reshape(1, 4)
        if b.ndim != 2 or b.shape[1] != 4:
            raise ValueError(f"targets[{i}] must be (K, 4) xyxy boxes, got {tuple(b.shape)}")
        b = b.clone()
        b[:, 0::2] = b[:, 0::2].clamp(0.0, width)
        b[:, 1::2] = b[:, 1::2].clamp(0.0, height)
        keep = (b[:, 2] > b[:, 0]) & (b[:, 3] > b[:, 1])
        b = b[keep]
        idx.append(torch.full((len(b),), float(i)))
        rows.append(b)
    xyxy = torch.cat(rows) if rows else torch.zeros(0, 4)
    scale = torch.tensor([width, height, width, height])
    xywh = torch.stack(
        ((xyxy[:, 0] + xyxy[:, 2]) / 2, (xyxy[:, 1] + xyxy[:, 3]) / 2,
         xyxy[:, 2] - xyxy[:, 0], xyxy[:, 3] - xyxy[:, 1]),
        dim=1,
    ) / scale
    n = len(xywh)
    return {
        "batch_idx": (torch.cat(idx) if idx else torch.zeros(0)).to(device),
        "cls": torch.zeros(n, 1, device=device),
        "bboxes": xywh.to(device),
    }


@torch.no_grad()
def postprocess_detections(
    preds: torch.Tensor | tuple[torch.Tensor, Any],
    *,
    conf: float = 0.001,
    iou: float = 0.6,
    max_det: int = 100,
) -> list[np.ndarray]:
    """Boxes from the detector's eval-mode output, after class-agnostic NMS.

    Args:
        preds: Eval-mode output, ``(decoded, raw)`` or the (B, 5, A) decoded tensor
            (centre xywh in input pixels, then the opacity probability).
        conf: Minimum confidence kept (0.001 for mAP; the RSNA score wants a real
            operating threshold, applied afterwards or here).
        iou: NMS IoU threshold.
        max_det: Most boxes kept per image.

    Returns:
        Per image, a float32 (M, 5) array ``[x1, y1, x2, y2, conf]`` in input pixels,
        sorted by descending confidence.

    Raises:
        ValueError: Thresholds outside [0, 1] or a non-positive ``max_det``.
    """
    if not (0.0 <= conf <= 1.0 and 0.0 <= iou <= 1.0):
        raise ValueError(f"conf and iou must be in [0, 1], got conf={conf}, iou={iou}")
    if max_det < 1:
        raise ValueError(f"max_det must be >= 1, got {max_det}")
    decoded = preds[0] if isinstance(preds, (tuple, list)) else preds
    if isinstance(decoded, Mapping):
        raise ValueError("postprocess_detections needs eval-mode output; call model.eval()")
    nms = _ultralytics()["non_max_suppression"]
    out = nms(
        decoded.float(), conf_thres=conf, iou_thres=iou, max_det=max_det, nc=1, agnostic=True
    )
    return [d[:, :5].float().cpu().numpy() for d in out]

