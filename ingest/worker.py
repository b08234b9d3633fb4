"""What a Dask worker runs: build one whole shard from its planned samples.

A shard is written under a temporary name and renamed when complete; then a small
``.ingest/done/<shard>.json`` records its result, so a restarted driver skips it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import resource
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ingest import transforms
from ingest.dicom import DicomRejected, describe
from ingest.plan import PlannedSample, Reject, ShardTask
from ingest.render import render
from shards.format import CLASS_NAMES
from shards.geometry import boxes_to_letterbox
from shards.label_csv import LabelProblem
from shards.manifest import SHARDS_DIR, WORK_DIR, atomic_write_text
from shards.writer import ShardWriter

log = logging.getLogger(__name__)

# One shard task per worker process is the unit of parallelism: OpenCV's own threads would
# only fight the other workers for the same cores.
cv2.setNumThreads(1)

DONE_DIR = f"{WORK_DIR}/done"
SLOW_ENV = "PNEUMO_INGEST_TEST_DELAY_S"
"""Test hook: seconds to sleep per shard, so a test can kill a run part-way."""


@dataclasses.dataclass
class ProcessedSample:
    """A sample ready to write: the image, its JSON, its label row, box problems."""

    image: np.ndarray
    meta: dict[str, Any]
    problems: list[LabelProblem]
    fast_path: bool


def process_sample(data: bytes, sample: PlannedSample, processing: dict) -> ProcessedSample:
    """Decode one DICOM's bytes and make the training sample (raises DicomRejected)."""
    rendered = render(data, processing)
    image, geom, decoded = rendered.image, rendered.geom, rendered.decoded
    rows, cols = decoded.rows, decoded.cols

    problems: list[LabelProblem] = []
    boxes_out: list[list[float]] = []
    for x, y, w, h in sample.boxes:
        src = np.array([[x, y, x + w, y + h]], dtype=np.float64)
        clipped = transforms.clip_boxes_xyxy(src, rows, cols)
        if (clipped[0, 2] - clipped[0, 0]) <= 0 or (clipped[0, 3] - clipped[0, 1]) <= 0:
            problems.append(LabelProblem("box_outside_image", f"box {[x, y, w, h]} lies outside {cols}x{rows}; dropped", sample.patient_id, sample.path))
            continue
        if not np.array_equal(clipped, src):
            problems.append(LabelProblem("box_clipped", f"box {[x, y, w, h]} clipped to the {cols}x{rows} image", sample.patient_id, sample.path))
        boxes_out.append([float(v) for v in boxes_to_letterbox(clipped, geom)[0]])

    meta = {
        "key": sample.key,
        "patient_id": sample.patient_id,
        "source": {"path": sample.path, "sha256": hashlib.sha256(data).hexdigest()},
        "split": sample.split,
        "target": sample.target,
        "class": sample.class_name,
        "boxes": boxes_out,
        "transform": geom.to_json(),
        "view_position": decoded.view_position,
        "sex": decoded.sex,
        "age": decoded.age,
    }
    return ProcessedSample(image, meta, problems, decoded.fast_path)


def label_row(meta: dict[str, Any], shard: int) -> dict[str, Any]:
    """The ``labels.zarr`` row of a sample, from its JSON."""
    cls = meta["class"]
    return {
        "key": meta["key"],
        "patient_id": meta["patient_id"],
        "split": meta["split"],
        "target": meta["target"],
        "class_id": CLASS_NAMES.index(cls) if cls in CLASS_NAMES else -1,
        "shard": shard,
        "view_position": meta["view_position"],
        "sex": meta["sex"],
        "age": meta["age"],
        "boxes": meta["boxes"],
    }


def build_shard(task: ShardTask) -> dict[str, Any]:
    """Build one shard; return (and persist) its result record.

    The record holds the shard's name, split, sample count, bytes, sha256, first/last key, the
    per-sample metadata, the rejects and the label problems found while building it.
    """
    t0, started = time.perf_counter(), time.time()
    out = Path(task.out)
    delay = float(os.environ.get(SLOW_ENV, "0") or 0)
    metas: list[dict[str, Any]] = []
    rejects: list[dict] = []
    problems: list[dict] = []
    fast = 0
    with ShardWriter(out / SHARDS_DIR / task.name) as writer:
        for sample in task.samples:
            try:
                data = (Path(task.dicom_dir) / sample.path).read_bytes()
            except OSError as exc:
                rejects.append(Reject(sample.path, "unreadable", f"{type(exc).__name__}: {exc}").to_json())
                continue
            try:
                done = process_sample(data, sample, task.processing)
            except DicomRejected as exc:
                rejects.append(Reject(sample.path, exc.reason, exc.detail).to_json())
                continue
            except Exception as exc:  # anything else one file raises costs that file, not the run
                rejects.append(Reject(sample.path, "decode_error", describe(exc)).to_json())
                continue
            writer.write(sample.key, done.image, done.meta)
            metas.append(done.meta)
            problems.extend(p.to_json() for p in done.problems)
            fast += done.fast_path
        if delay:
            time.sleep(delay)
    written = writer.result
    assert written is not None
    record = {
        "name": task.name,
        "split": task.split,
        "samples": written.samples,
        "bytes": written.bytes,
        "sha256": written.sha256,
        "first_key": written.first_key,
        "last_key": written.last_key,
        "metas": metas,
        "rejects": rejects,
        "problems": problems,
        "fast_path": fast,
        "seconds": time.perf_counter() - t0,
        "started": started,
        "finished": time.time(),
        "worker_pid": os.getpid(),
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    done_dir = out / DONE_DIR
    done_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(done_dir / f"{task.name}.json", json.dumps(record))
    return record
