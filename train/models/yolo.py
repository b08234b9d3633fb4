"""The few ultralytics pieces this project uses, imported offline.

Only ``DetectionModel``, ``v8DetectionLoss``, ``non_max_suppression`` and ``get_cfg`` are
used: never its trainer, validator, predictor, ``YOLO()`` or plotting.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["load_ultralytics"]


def load_ultralytics() -> dict[str, Any]:
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
