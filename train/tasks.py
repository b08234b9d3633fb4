"""The two training tasks: what differs between the classifier and the detector (the loss,
what a prediction is, which metrics), behind one small interface that :mod:`train.loop`
calls: ``loss(model, out, batch)``, ``predict(out, batch, host)``, ``metrics(records)``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from train.data import DeviceBatch, HostBatch
from train.metrics import average_precision_50, classification_metrics, roc_auc, rsna_score
from train.models import DetectionLoss, postprocess_detections

__all__ = ["MAP_CONF", "RSNA_CONF_GRID", "ClassifyTask", "DetectTask", "Task"]

RSNA_CONF_GRID = tuple(round(c, 2) for c in np.arange(0.05, 0.96, 0.05))
"""Confidence thresholds tried for the best RSNA score on val."""
MAP_CONF = 0.001
"""Lowest confidence kept for mAP@0.5 (the usual COCO-style setting)."""


class ClassifyTask:
    """Pneumonia yes/no: binary cross-entropy on one logit; unlabelled samples masked."""

    name = "classify"
    terms = ("loss",)

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    def loss(self, model: nn.Module, out: torch.Tensor, batch: DeviceBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        labelled = batch.target >= 0
        bce = F.binary_cross_entropy_with_logits(
            out.float(), batch.target.clamp(min=0).float(), reduction="none"
        )
        total = (bce * labelled).sum() / labelled.sum().clamp(min=1)
        return total, [total.detach()]

    def predict(self, out: torch.Tensor, batch: DeviceBatch, host: HostBatch) -> list[tuple]:
        probs = torch.sigmoid(out.float()).cpu().numpy()
        return [(int(host.index[i]), float(probs[i]), int(host.target[i]))
                for i in range(len(host)) if bool(host.valid[i])]

    def metrics(self, records: list[tuple]) -> dict[str, Any]:
        probs = np.array([r[1] for r in records])
        targets = np.array([r[2] for r in records])
        labelled = targets >= 0
        return classification_metrics(probs[labelled], targets[labelled], self.threshold)


class DetectTask:
    """Opacity boxes: the YOLOv8 loss (``v8DetectionLoss``), ultralytics NMS.

    YOLOv8 is anchor-free (each grid cell regresses distances to the box sides, assigned by
    the task-aligned assigner), so there are no anchors to fit to the RSNA box sizes.
    """

    name = "detect"
    terms = ("loss", "box", "cls", "dfl")

    def __init__(self, model: nn.Module, *, stored_size: int, conf: float, iou: float,
                 max_det: int) -> None:
        self.criterion = DetectionLoss(model)
        self.stored_size, self.conf, self.iou, self.max_det = stored_size, conf, iou, max_det

    def loss(self, model: nn.Module, out: Any, batch: DeviceBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        total, terms = self.criterion(out, batch.boxes_per_image(), image_size=batch.size)
        return total, [total.detach(), terms["box"], terms["cls"], terms["dfl"]]

    def detections(self, out: Any, size: int, *, conf: float) -> list[np.ndarray]:
        """Per image (M, 5) ``[x1, y1, x2, y2, conf]`` in stored-image pixels."""
        dets = postprocess_detections(out, conf=conf, iou=self.iou, max_det=max(self.max_det, 100))
        scale = self.stored_size / size
        for d in dets:
            d[:, :4] *= scale
        return dets

    def predict(self, out: Any, batch: DeviceBatch, host: HostBatch) -> list[tuple]:
        dets = self.detections(out, batch.size, conf=MAP_CONF)
        truths = [host.boxes[host.box_index == i].numpy() for i in range(len(host))]
        return [(int(host.index[i]), dets[i], truths[i], int(host.target[i]))
                for i in range(len(host)) if bool(host.valid[i])]

    def metrics(self, records: list[tuple]) -> dict[str, Any]:
        dets = [r[1] for r in records]
        truths = [r[2] for r in records]
        top = [d[: self.max_det] for d in dets]
        out: dict[str, Any] = {"map50": average_precision_50(top, truths)}
        out["rsna"] = rsna_score([d[d[:, 4] >= self.conf] for d in top], truths)
        best = max(RSNA_CONF_GRID, key=lambda c: _nan_low(rsna_score([d[d[:, 4] >= c] for d in top], truths)))
        out["rsna_best"] = rsna_score([d[d[:, 4] >= best] for d in top], truths)
        out["rsna_best_conf"] = best
        out["conf"] = self.conf
        targets = np.array([r[3] for r in records])
        score = np.array([float(d[:, 4].max()) if len(d) else 0.0 for d in dets])
        labelled = targets >= 0
        out["image_auc"] = roc_auc(score[labelled], targets[labelled])
        out["boxes_true"] = int(sum(len(t) for t in truths))
        return out


def _nan_low(x: float) -> float:
    return -1.0 if math.isnan(x) else x


Task = ClassifyTask | DetectTask
