"""train.tasks: every task is reachable by its name and answers the whole interface; the
classifier's records, metrics and CSV cells; the detector's source-pixel boxes and CSV cells;
predict's per-patient merge. Small CPU tensors, no training."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.geometry import letterbox_geometry
from train.config import TASKS, EvalConfig, ModelConfig
from train.data import DeviceBatch, HostBatch
from train.predict import write_csv
from train.tasks import (
    TASK_TYPES,
    ClassifyRecord,
    ClassifyTask,
    DetectTask,
    SourceBox,
    Task,
    source_boxes,
    task_type,
)

INTERFACE = ("name", "terms", "summary", "needs_labels", "csv_header", "build_model", "create", "loss",
             "predict", "metrics", "submission", "merge", "csv_cell")


def test_every_configurable_task_has_a_type_with_the_whole_interface():
    assert set(TASK_TYPES) == set(TASKS)
    for name, kind in TASK_TYPES.items():
        assert kind.name == name
        assert kind.terms[0] == "loss"
        missing = [attr for attr in INTERFACE if not hasattr(kind, attr)]
        assert not missing, f"{name} lacks {missing}"


def test_unknown_task_is_a_one_line_value_error():
    with pytest.raises(ValueError, match=r"^task 'segment': allowed classify, detect$"):
        task_type("segment")


def _host(targets: list[int], valid: list[bool], patients: list[str] | None = None) -> HostBatch:
    n = len(targets)
    meta = None
    if patients is not None:
        transform = letterbox_geometry(128, 128, 64).to_json()
        meta = [{"patient_id": p, "transform": transform} for p in patients]
    return HostBatch(step=0, images=torch.zeros(n, 8, 8, dtype=torch.uint8), target=torch.tensor(targets),
                     boxes=torch.zeros(0, 4), box_index=torch.zeros(0, dtype=torch.int64),
                     index=torch.arange(10, 10 + n), valid=torch.tensor(valid),
                     keys=[f"k{i}" for i in range(n)], meta=meta)


def _dev(host: HostBatch) -> DeviceBatch:
    return DeviceBatch(images=host.images[:, None].float(), target=host.target, boxes=host.boxes,
                       box_index=host.box_index, valid=host.valid, size=8)


def test_classifier_records_skip_padding_and_carry_probability_and_target():
    task: Task = ClassifyTask.create(torch.nn.Identity(), EvalConfig(threshold=0.5), stored_size=8)
    host = _host([1, 0, -1, 1], [True, True, True, False])
    records = task.predict(torch.tensor([0.0, 2.0, -2.0, 5.0]), _dev(host), host)
    assert [r.index for r in records] == [10, 11, 12]
    assert records[0] == ClassifyRecord(10, 0.5, 1)
    assert records[1].probability == pytest.approx(1 / (1 + np.exp(-2.0)))
    metrics = task.metrics(records)  # the unlabelled sample is left out
    assert metrics["accuracy"] == 0.5  # 0.5 >= threshold: positive (right); 0.88: positive (wrong)


def test_classifier_loss_masks_unlabelled_samples():
    task = ClassifyTask(0.5)
    host = _host([1, -1], [True, True])
    total, terms = task.loss(torch.nn.Identity(), torch.tensor([0.0, 100.0]), _dev(host))
    assert total.item() == pytest.approx(np.log(2.0)) and len(terms) == len(task.terms)


def test_classifier_submission_names_each_valid_patient():
    task = ClassifyTask(0.5)
    host = _host([1, 0, 0], [True, True, False], patients=["a", "b", "pad"])
    rows = task.submission(torch.tensor([0.0, 0.0, 0.0]), _dev(host), host)
    assert rows == [("a", 0.5), ("b", 0.5)]


def test_submission_without_metadata_is_an_error():
    host = _host([1], [True])
    with pytest.raises(ValueError, match="with_meta"):
        ClassifyTask(0.5).submission(torch.tensor([0.0]), _dev(host), host)


# stored-frame (x1, y1, x2, y2, conf) in a 64-px letterbox of a 128 x 128 source, expected boxes
SOURCE_BOXES = [
    ([[8, 16, 24, 48, 0.9]], [SourceBox(0.9, 16.0, 32.0, 32.0, 64.0)]),  # scale 2
    ([[-4, 0, 8, 8, 0.5]], [SourceBox(0.5, 0.0, 0.0, 16.0, 16.0)]),  # clipped at the left edge
    ([[70, 0, 80, 8, 0.5]], []),  # wholly outside: dropped
    (np.zeros((0, 5)), []),
]


@pytest.mark.parametrize(("dets", "expected"), SOURCE_BOXES, ids=["scaled", "clipped", "outside", "none"])
def test_detections_map_back_to_source_pixels(dets, expected):
    transform = letterbox_geometry(128, 128, 64).to_json()
    got = source_boxes(np.asarray(dets, dtype=np.float32), transform)
    assert [tuple(round(v, 4) for v in b) for b in got] == [tuple(b) for b in expected]


def test_detector_csv_cell_ranks_boxes_by_confidence():
    boxes = [SourceBox(0.2, 1, 2, 3, 4), SourceBox(0.8, 5, 6, 7, 8)]
    assert DetectTask.csv_cell(boxes) == "0.8000 5.0 6.0 7.0 8.0 0.2000 1.0 2.0 3.0 4.0"
    assert DetectTask.csv_cell([]) == ""


# task, rows from predict (a patient may have several images), expected CSV
WRITE_CASES = [
    ("classify", [("b", 0.25), ("a", 0.5), ("b", 0.75), ("b", 0.5)],
     [["patientId", "probability"], ["a", "0.500000"], ["b", "0.750000"]]),
    ("detect", [("p", [SourceBox(0.3, 0, 0, 1, 1)]), ("q", []), ("p", [SourceBox(0.9, 2, 2, 1, 1)])],
     [["patientId", "PredictionString"], ["p", "0.9000 2.0 2.0 1.0 1.0 0.3000 0.0 0.0 1.0 1.0"], ["q", ""]]),
]


@pytest.mark.parametrize(("task", "rows", "expected"), WRITE_CASES, ids=[c[0] for c in WRITE_CASES])
def test_write_csv_merges_each_patients_images(tmp_path: Path, task: str, rows, expected):
    out = tmp_path / "sub.csv"
    assert write_csv(out, iter(rows), task_type(task)) == len(expected) - 1
    assert list(csv.reader(out.open())) == expected
    assert [p.name for p in tmp_path.iterdir()] == ["sub.csv"]


def test_classifier_builds_with_the_configured_shape_and_prior():
    model, blocks = ClassifyTask.build_model(ModelConfig(task="classify", width=8, depth=2), prior=0.2)
    assert len(blocks) == 2
    assert model.head[-1].bias.item() == pytest.approx(np.log(0.2 / 0.8))
