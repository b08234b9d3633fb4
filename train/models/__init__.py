"""The networks: a small CNN classifier and a one-channel, one-class YOLOv8 detector.

* :mod:`train.models.classifier`: ``PneumoniaCNN`` and ``ClassifierConfig``.
* :mod:`train.models.detector`: ``build_detector``, ``DetectionLoss``, ``postprocess_detections``.
* :mod:`train.models.weights`: reading initial weights (``read_weights``, ``load_detector_weights``).
* :mod:`train.models.yolo`: the ultralytics pieces used, imported offline.

Models never touch ``torch.distributed``: they expose their main blocks
(:attr:`PneumoniaCNN.blocks`, :func:`detector_blocks`) and ``train.distributed`` wraps them
(DDP, or FSDP2 one block at a time). Images arrive as float (B, 1, H, W), already normalised
by the data pipeline.
"""

from __future__ import annotations

from train.models.classifier import ClassifierConfig, PneumoniaCNN
from train.models.detector import DetectionLoss, build_detector, detector_blocks, postprocess_detections
from train.models.weights import load_detector_weights, read_weights

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
