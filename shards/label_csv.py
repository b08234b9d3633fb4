"""Reading RSNA's label CSVs (``stage_2_train_labels.csv``, the class file) into per-patient
labels, reporting every problem found. (``labels.zarr``, the dataset's own label table, is
:mod:`shards.labels`.)

The ingest builds its samples from these labels and ``python -m shards verify --labels``
accounts for them with the same reader, so it lives in the format layer.

A file that cannot be parsed at all raises :class:`LabelFileError` (the run stops before any
work). Problems in single rows become :class:`LabelProblem` values and the run goes on.
"""

from __future__ import annotations

import csv
import dataclasses
import math
from pathlib import Path

from shards.format import CLASS_NAMES, POSITIVE_CLASS

LABEL_COLUMNS = ("patientId", "x", "y", "width", "height", "Target")
CLASS_COLUMNS = ("patientId", "class")


class LabelFileError(ValueError):
    """A labels file that cannot be used at all (missing, wrong columns, not CSV)."""


@dataclasses.dataclass(frozen=True)
class LabelProblem:
    """One problem in the labels; written to ``rejects.jsonl`` with ``kind: label``."""

    reason: str
    detail: str
    patient_id: str | None = None
    path: str | None = None
    line: int | None = None

    def to_json(self) -> dict:
        return {"kind": "label", **dataclasses.asdict(self)}


@dataclasses.dataclass
class PatientLabel:
    """A patient's label: target, boxes in source pixels (x, y, w, h), detailed class."""

    patient_id: str
    target: int
    boxes: list[tuple[float, float, float, float]] = dataclasses.field(default_factory=list)
    class_name: str | None = None


def _open_csv(path: Path, columns: tuple[str, ...]) -> csv.DictReader:
    if not path.is_file():
        raise LabelFileError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LabelFileError(f"{path}: cannot read as UTF-8 text ({exc})") from exc
    reader = csv.DictReader(text.splitlines())
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [c for c in columns if c not in header]
    if missing:
        raise LabelFileError(f"{path}: header {header} lacks column(s) {missing}; want {list(columns)}")
    reader.fieldnames = header
    return reader


def _num(value: str | None) -> float | None:
    value = (value or "").strip()
    if not value:
        return None
    x = float(value)  # ValueError propagates to the caller's row handling
    if not math.isfinite(x):
        raise ValueError(f"non-finite {value!r}")
    return x


def read_label_csv(
    labels: Path, class_info: Path | None = None
) -> tuple[dict[str, PatientLabel], list[LabelProblem]]:
    """Parse ``stage_2_train_labels.csv`` (and optionally the class file).

    Returns:
        (patient id -> label, problems). Rows with problems are reported and skipped (or, for a
        positive row without a box, kept as a positive without that box).

    Raises:
        LabelFileError: the file is missing or has the wrong columns.
    """
    out: dict[str, PatientLabel] = {}
    problems: list[LabelProblem] = []
    src = str(labels)

    def problem(reason: str, detail: str, pid: str | None, line: int, path: str = src) -> None:
        problems.append(LabelProblem(reason, detail, pid, path, line))

    for line, row in enumerate(_open_csv(labels, LABEL_COLUMNS), start=2):
        pid = (row.get("patientId") or "").strip()
        if not pid:
            problem("missing_patient_id", "row has an empty patientId", None, line)
            continue
        target_text = (row.get("Target") or "").strip()
        if target_text not in ("0", "1"):
            problem("bad_target", f"Target={target_text!r}, want 0 or 1", pid, line)
            continue
        target = int(target_text)
        label = out.setdefault(pid, PatientLabel(pid, target))
        if label.target != target:
            problem("conflicting_target", f"rows give Target {label.target} and {target}; using 1", pid, line)
            label.target = 1
        try:
            fields = [_num(row.get(c)) for c in ("x", "y", "width", "height")]
        except ValueError as exc:
            problem("bad_box", f"non-numeric box field ({exc})", pid, line)
            continue
        if all(f is None for f in fields):
            if target == 1:
                problem("positive_without_box", "Target=1 row has empty box fields", pid, line)
            continue
        if any(f is None for f in fields):
            problem("bad_box", f"box fields partly empty: {fields}", pid, line)
            continue
        x, y, w, h = fields  # type: ignore[misc]
        if target == 0:
            problem("negative_with_box", f"Target=0 row has a box {fields}; box ignored", pid, line)
            continue
        if w <= 0 or h <= 0:
            problem("bad_box", f"non-positive size width={w} height={h}", pid, line)
            continue
        label.boxes.append((x, y, w, h))

    if class_info is not None:
        csrc = str(class_info)
        for line, row in enumerate(_open_csv(class_info, CLASS_COLUMNS), start=2):
            pid = (row.get("patientId") or "").strip()
            name = (row.get("class") or "").strip()
            if name not in CLASS_NAMES:
                problem("bad_class", f"class {name!r} not one of {list(CLASS_NAMES)}", pid, line, csrc)
                continue
            label = out.get(pid)
            if label is None:
                problem("class_without_label", "patient in class file but not in labels", pid, line, csrc)
                continue
            if label.class_name not in (None, name):
                problem("conflicting_class", f"classes {label.class_name!r} and {name!r}", pid, line, csrc)
                continue
            if (name == POSITIVE_CLASS) != (label.target == 1):
                problem("class_target_mismatch", f"class {name!r} with Target={label.target}", pid, line, csrc)
            label.class_name = name
    return out, problems
