"""The training tasks: everything that differs between the classifier and the detector, behind
one interface (:class:`Task`) that :mod:`train.build`, :mod:`train.loop` and
:mod:`train.predict` call without asking which task it is.

A task builds its network, computes the loss, turns a validation batch's outputs into typed
records and the records into metrics, and turns a prediction batch into CSV rows. Adding a
task means one class here, one entry in :data:`TASK_TYPES` and its name in
``train.config.TASKS``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, ClassVar, NamedTuple, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from shards.geometry import boxes_from_letterbox
from train.config import EvalConfig, ModelConfig
from train.data import DeviceBatch, HostBatch
from train.metrics import average_precision_50, classification_metrics, roc_auc, rsna_score
from train.models import (
    ClassifierConfig,
    DetectionLoss,
    PneumoniaCNN,
    build_detector,
    detector_blocks,
    postprocess_detections,
    read_weights,
)

__all__ = [
    "MAP_CONF",
    "RSNA_CONF_GRID",
    "TASK_TYPES",
    "ClassifyRecord",
    "ClassifyTask",
    "DetectRecord",
    "DetectTask",
    "EvalRecord",
    "SourceBox",
    "Task",
    "task_type",
]

log = logging.getLogger(__name__)

RSNA_CONF_GRID = tuple(round(c, 2) for c in np.arange(0.05, 0.96, 0.05))
"""Confidence thresholds tried for the best RSNA score on val."""
MAP_CONF = 0.001
"""Lowest confidence kept for mAP@0.5 (the usual COCO-style setting)."""


class EvalRecord(Protocol):
    """What every task's per-sample validation record has: the sample it belongs to."""

    @property
    def index(self) -> int:
        """Global sample index (labels.zarr row), for the exactly-once check."""
        ...


class ClassifyRecord(NamedTuple):
    """One validation sample of the classifier."""

    index: int
    """Global sample index."""
    probability: float
    """Predicted probability of pneumonia."""
    target: int
    """Label (1, 0; -1 unlabelled)."""


class DetectRecord(NamedTuple):
    """One validation sample of the detector."""

    index: int
    """Global sample index."""
    boxes: np.ndarray
    """(M, 5) ``[x1, y1, x2, y2, conf]`` in stored-image pixels, by descending confidence."""
    truth: np.ndarray
    """(K, 4) true boxes ``[x1, y1, x2, y2]`` in stored-image pixels."""
    target: int
    """Image label (1, 0; -1 unlabelled)."""


class SourceBox(NamedTuple):
    """A predicted box in pixels of the source DICOM, as the RSNA submission writes it."""

    conf: float
    x: float
    """Left edge."""
    y: float
    """Top edge."""
    width: float
    height: float


class Task(Protocol):
    """What a training task provides to the build, the loop and prediction."""

    name: ClassVar[str]
    """The ``model.task`` value that selects it."""
    terms: ClassVar[tuple[str, ...]]
    """Names of the loss terms :meth:`loss` returns, the total first (metrics.jsonl keys)."""
    summary: ClassVar[tuple[str, ...]]
    """Metrics shown in the log line of each evaluation."""
    needs_labels: ClassVar[bool]
    """Whether every training sample must be labelled (else unlabelled ones are masked)."""
    csv_header: ClassVar[tuple[str, str]]
    """The prediction CSV's header: patient id column, prediction column."""

    @classmethod
    def build_model(cls, cfg: ModelConfig, *, prior: float | None = None) -> tuple[nn.Module, list[nn.Module]]:
        """The unwrapped network (initial weights loaded) and its main blocks (FSDP2 units).

        Args:
            cfg: Architecture, shape and initial weights.
            prior: The train split's positive rate, where the network's initial bias uses it.

        Raises:
            ValueError: ``cfg.weights`` does not fit, or pickles objects without ``trust_weights``.
            FileNotFoundError: ``cfg.weights`` does not exist.
        """
        ...

    @classmethod
    def create(cls, model: nn.Module, settings: EvalConfig, *, stored_size: int) -> Task:
        """The task for a built (unwrapped) ``model``, its thresholds from ``settings``."""
        ...

    def loss(self, model: nn.Module, out: Any, batch: DeviceBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(total, [total, *terms])``: the total for ``backward`` and detached terms as named by
        :attr:`terms`."""
        ...

    def predict(self, out: Any, batch: DeviceBatch, host: HostBatch) -> list[EvalRecord]:
        """One record per valid (non-padding) sample of a validation batch."""
        ...

    def metrics(self, records: Sequence[Any]) -> dict[str, Any]:
        """The metrics of a whole split's records (every sample once)."""
        ...

    def submission(self, out: Any, batch: DeviceBatch, host: HostBatch) -> list[tuple[str, Any]]:
        """``(patient id, prediction)`` per valid sample of a ``with_meta`` batch."""
        ...

    @staticmethod
    def merge(first: Any, second: Any) -> Any:
        """One patient's prediction from two of its images."""
        ...

    @staticmethod
    def csv_cell(prediction: Any) -> str:
        """A patient's prediction as the CSV's second column."""
        ...


class ClassifyTask:
    """Pneumonia yes/no: binary cross-entropy on one logit; unlabelled samples masked."""

    name: ClassVar[str] = "classify"
    terms: ClassVar[tuple[str, ...]] = ("loss",)
    summary: ClassVar[tuple[str, ...]] = (
        "accuracy", "roc_auc", "sensitivity", "specificity", "f1", "baseline_accuracy")
    needs_labels: ClassVar[bool] = False
    csv_header: ClassVar[tuple[str, str]] = ("patientId", "probability")

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold

    @classmethod
    def build_model(cls, cfg: ModelConfig, *, prior: float | None = None) -> tuple[nn.Module, list[nn.Module]]:
        model = PneumoniaCNN(ClassifierConfig(width=cfg.width, depth=cfg.depth, dropout=cfg.dropout, prior=prior))
        if cfg.weights is not None:
            state = read_weights(cfg.weights, trust_pickle=cfg.trust_weights)
            state = state.get("state_dict", state) if isinstance(state, dict) else state
            state = {k.removeprefix("module."): v for k, v in state.items()}
            try:
                model.load_state_dict(state)
            except RuntimeError as err:  # key or shape mismatch: a usage error, not a crash
                raise ValueError(f"{cfg.weights} does not fit the classifier (width={cfg.width}, "
                                 f"depth={cfg.depth}): {str(err).splitlines()[0]}") from err
            log.info("loaded classifier weights from %s", cfg.weights)
        return model, list(model.blocks)

    @classmethod
    def create(cls, model: nn.Module, settings: EvalConfig, *, stored_size: int) -> ClassifyTask:
        return cls(settings.threshold)

    def loss(self, model: nn.Module, out: torch.Tensor, batch: DeviceBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        labelled = batch.target >= 0
        bce = F.binary_cross_entropy_with_logits(
            out.float(), batch.target.clamp(min=0).float(), reduction="none"
        )
        total = (bce * labelled).sum() / labelled.sum().clamp(min=1)
        return total, [total.detach()]

    def _probabilities(self, out: torch.Tensor) -> np.ndarray:
        return torch.sigmoid(out.float()).cpu().numpy()

    def predict(self, out: torch.Tensor, batch: DeviceBatch, host: HostBatch) -> list[ClassifyRecord]:
        probs = self._probabilities(out)
        return [ClassifyRecord(int(host.index[i]), float(probs[i]), int(host.target[i]))
                for i in range(len(host)) if bool(host.valid[i])]

    def metrics(self, records: Sequence[ClassifyRecord]) -> dict[str, Any]:
        probs = np.array([r.probability for r in records])
        targets = np.array([r.target for r in records])
        labelled = targets >= 0
        return classification_metrics(probs[labelled], targets[labelled], self.threshold)

    def submission(self, out: torch.Tensor, batch: DeviceBatch, host: HostBatch) -> list[tuple[str, float]]:
        probs = self._probabilities(out)
        return [(meta["patient_id"], float(probs[i])) for i, meta in enumerate(_meta(host))
                if bool(host.valid[i])]

    @staticmethod
    def merge(first: float, second: float) -> float:
        return max(first, second)

    @staticmethod
    def csv_cell(prediction: float) -> str:
        return f"{prediction:.6f}"


class DetectTask:
    """Opacity boxes: the YOLOv8 loss (``v8DetectionLoss``), ultralytics NMS.

    YOLOv8 is anchor-free (each grid cell regresses distances to the box sides, assigned by
    the task-aligned assigner), so there are no anchors to fit to the RSNA box sizes.
    """

    name: ClassVar[str] = "detect"
    terms: ClassVar[tuple[str, ...]] = ("loss", "box", "cls", "dfl")
    summary: ClassVar[tuple[str, ...]] = ("map50", "rsna", "rsna_best", "rsna_best_conf", "image_auc")
    needs_labels: ClassVar[bool] = True
    csv_header: ClassVar[tuple[str, str]] = ("patientId", "PredictionString")

    def __init__(self, model: nn.Module, *, stored_size: int, conf: float, iou: float,
                 max_det: int) -> None:
        self.criterion = DetectionLoss(model)
        self.stored_size, self.conf, self.iou, self.max_det = stored_size, conf, iou, max_det

    @classmethod
    def build_model(cls, cfg: ModelConfig, *, prior: float | None = None) -> tuple[nn.Module, list[nn.Module]]:
        model = build_detector(cfg.name or "yolov8n", weights=cfg.weights, trust_pickle=cfg.trust_weights)
        return model, detector_blocks(model)

    @classmethod
    def create(cls, model: nn.Module, settings: EvalConfig, *, stored_size: int) -> DetectTask:
        return cls(model, stored_size=stored_size, conf=settings.conf, iou=settings.iou,
                   max_det=settings.max_det)

    def loss(self, model: nn.Module, out: Any, batch: DeviceBatch) -> tuple[torch.Tensor, list[torch.Tensor]]:
        total, terms = self.criterion(out, batch.boxes_per_image(), image_size=batch.size)
        return total, [total.detach(), *(terms[t] for t in self.terms[1:])]

    def detections(self, out: Any, size: int, *, conf: float) -> list[np.ndarray]:
        """Per image (M, 5) ``[x1, y1, x2, y2, conf]`` in stored-image pixels."""
        dets = postprocess_detections(out, conf=conf, iou=self.iou, max_det=max(self.max_det, 100))
        scale = self.stored_size / size
        for d in dets:
            d[:, :4] *= scale
        return dets

    def predict(self, out: Any, batch: DeviceBatch, host: HostBatch) -> list[DetectRecord]:
        dets = self.detections(out, batch.size, conf=MAP_CONF)
        truths = [host.boxes[host.box_index == i].numpy() for i in range(len(host))]
        return [DetectRecord(int(host.index[i]), dets[i], truths[i], int(host.target[i]))
                for i in range(len(host)) if bool(host.valid[i])]

    def metrics(self, records: Sequence[DetectRecord]) -> dict[str, Any]:
        truths = [r.truth for r in records]
        top = [r.boxes[: self.max_det] for r in records]
        out: dict[str, Any] = {"map50": average_precision_50(top, truths)}
        out["rsna"] = rsna_score([d[d[:, 4] >= self.conf] for d in top], truths)
        best = max(RSNA_CONF_GRID, key=lambda c: _nan_low(rsna_score([d[d[:, 4] >= c] for d in top], truths)))
        out["rsna_best"] = rsna_score([d[d[:, 4] >= best] for d in top], truths)
        out["rsna_best_conf"] = best
        out["conf"] = self.conf
        targets = np.array([r.target for r in records])
        score = np.array([float(r.boxes[:, 4].max()) if len(r.boxes) else 0.0 for r in records])
        labelled = targets >= 0
        out["image_auc"] = roc_auc(score[labelled], targets[labelled])
        out["boxes_true"] = int(sum(len(t) for t in truths))
        return out

    def submission(self, out: Any, batch: DeviceBatch, host: HostBatch) -> list[tuple[str, list[SourceBox]]]:
        dets = self.detections(out, batch.size, conf=self.conf)
        return [(meta["patient_id"], source_boxes(dets[i][: self.max_det], meta["transform"]))
                for i, meta in enumerate(_meta(host)) if bool(host.valid[i])]

    @staticmethod
    def merge(first: list[SourceBox], second: list[SourceBox]) -> list[SourceBox]:
        return [*first, *second]

    @staticmethod
    def csv_cell(prediction: list[SourceBox]) -> str:
        ranked = sorted(prediction, key=lambda b: -b.conf)
        return " ".join(f"{b.conf:.4f} {b.x:.1f} {b.y:.1f} {b.width:.1f} {b.height:.1f}" for b in ranked)


def source_boxes(dets: np.ndarray, transform: dict) -> list[SourceBox]:
    """(M, 5) stored-frame ``[x1, y1, x2, y2, conf]`` -> boxes in source pixels, through the
    sample's letterbox ``transform``, clipped to the source image; boxes left empty dropped."""
    if len(dets) == 0:
        return []
    src = boxes_from_letterbox(dets[:, :4], transform)
    cols, rows = float(transform["cols"]), float(transform["rows"])
    src[:, [0, 2]] = src[:, [0, 2]].clip(0, cols)
    src[:, [1, 3]] = src[:, [1, 3]].clip(0, rows)
    return [SourceBox(float(conf), float(x1), float(y1), float(x2 - x1), float(y2 - y1))
            for (x1, y1, x2, y2), conf in zip(src, dets[:, 4]) if x2 > x1 and y2 > y1]


def _meta(host: HostBatch) -> list[dict[str, Any]]:
    if host.meta is None:
        raise ValueError("a prediction batch needs the samples' metadata (a with_meta loader)")
    return host.meta


def _nan_low(x: float) -> float:
    return -1.0 if math.isnan(x) else x


TASK_TYPES: dict[str, type[ClassifyTask] | type[DetectTask]] = {
    ClassifyTask.name: ClassifyTask,
    DetectTask.name: DetectTask,
}
"""Every task by its ``model.task`` name."""


def task_type(name: str) -> type[Task]:
    """The task class named ``name``.

    Raises:
        ValueError: No such task.
    """
    try:
        return TASK_TYPES[name]
    except KeyError:
        raise ValueError(f"task {name!r}: allowed {', '.join(TASK_TYPES)}") from None
