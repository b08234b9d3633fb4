"""The detector: a one-channel, one-class YOLOv8 (:func:`build_detector`), its loss on this
project's targets (:class:`DetectionLoss`) and its postprocessing
(:func:`postprocess_detections`).

Boxes are ``[x1, y1, x2, y2]`` in the pixel frame of the shards (640 x 640). Ultralytics is
imported lazily (:func:`train.models.yolo.load_ultralytics`), only when a detector is built.
The detector never touches ``torch.distributed``: :func:`detector_blocks` names its units and
``train.distributed`` wraps them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from train.config import DETECTORS
from train.models.weights import load_detector_weights
from train.models.yolo import load_ultralytics

__all__ = ["DetectionLoss", "build_detector", "detector_blocks", "postprocess_detections"]


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
    ul = load_ultralytics()
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
        self._ul = load_ultralytics()
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
    nms = load_ultralytics()["non_max_suppression"]
    out = nms(
        decoded.float(), conf_thres=conf, iou_thres=iou, max_det=max_det, nc=1, agnostic=True
    )
    return [d[:, :5].float().cpu().numpy() for d in out]
