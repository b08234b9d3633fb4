"""``labels.zarr``: the per-sample label table, one row per ingested sample.

Rows are aligned by sample index (the order of samples across the manifest's shards). Boxes are
ragged: the boxes of row ``i`` are ``boxes[box_offsets[i]:box_offsets[i + 1]]`` (float32 xyxy
in pixels of the stored image). ``qa`` is the bitmask of each sample's QA flags
(:mod:`shards.qa`); a store written before format version 3 has none and reads as unflagged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from shards.atomic import atomic_dir
from shards.format import CLASS_NAMES, FORMAT_VERSION, FormatError
from shards.qa import QA_DTYPE, qa_mask

STRING_FIELDS = ("key", "patient_id", "split", "view_position", "sex")
INT_FIELDS = {"target": np.int8, "class_id": np.int8, "shard": np.int32, "age": np.int16}
ALL_FIELDS = (*STRING_FIELDS, *INT_FIELDS, "boxes", "box_offsets")
"""Arrays every version of the store holds."""
QA_FIELD = "qa"
"""The QA bitmask array (format version 3 on), zeros when a store has none."""
CHUNK = 65536


@dataclasses.dataclass(frozen=True)
class LabelRow:
    """One sample's row of the label table, as the table stores it (empty strings and -1 for
    unknown values)."""

    key: str
    patient_id: str
    split: str
    target: int
    class_id: int
    """Index into :data:`shards.format.CLASS_NAMES`; -1 for none."""
    shard: int
    """Index of the sample's shard in the manifest."""
    view_position: str
    sex: str
    age: int
    qa: int | None
    """Bitmask of the sample's QA flags (:mod:`shards.qa`); None for a JSON whose flag list is
    malformed (the verifier reports it apart)."""
    boxes: Sequence[Sequence[float]]
    """``[[x1, y1, x2, y2], ...]`` in pixels of the stored image."""

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any], shard: int) -> "LabelRow":
        """The row of a sample from its JSON (a field missing from it counts as unknown).

        The ingest writes these rows; the verifier compares each sample's JSON against its row
        through the same mapping.
        """
        cls_name = meta.get("class")

        def text(field: str) -> str:
            return str(meta.get(field) or "")

        def number(field: str) -> int:
            value = meta.get(field)
            return -1 if value is None else value

        return cls(
            key=text("key"),
            patient_id=text("patient_id"),
            split=text("split"),
            target=number("target"),
            class_id=CLASS_NAMES.index(cls_name) if cls_name in CLASS_NAMES else -1,
            shard=shard,
            view_position=text("view_position"),
            sex=text("sex"),
            age=number("age"),
            qa=_qa_mask_or_none(meta.get("qa", [])),
            boxes=meta.get("boxes") or [],
        )


def _qa_mask_or_none(flags: Any) -> int | None:
    try:
        return qa_mask(flags)
    except (TypeError, ValueError):
        return None


@dataclasses.dataclass
class LabelTable:
    """The label store in memory: one numpy array per field, aligned by sample index."""

    key: np.ndarray
    patient_id: np.ndarray
    split: np.ndarray
    target: np.ndarray
    class_id: np.ndarray
    shard: np.ndarray
    view_position: np.ndarray
    sex: np.ndarray
    age: np.ndarray
    boxes: np.ndarray
    box_offsets: np.ndarray
    qa: np.ndarray | None = None
    """QA bitmask per row (:data:`shards.qa.QA_DTYPE`); None becomes all zeros."""

    def __post_init__(self) -> None:
        if self.qa is None:
            self.qa = np.zeros(len(self.key), dtype=QA_DTYPE)

    def __len__(self) -> int:
        return len(self.key)

    def boxes_of(self, i: int) -> np.ndarray:
        """The (M, 4) float32 boxes of row ``i``."""
        return self.boxes[self.box_offsets[i] : self.box_offsets[i + 1]]

    def index(self) -> dict[str, int]:
        """Map each key to its row."""
        return {str(k): i for i, k in enumerate(self.key)}

    def take(self, rows: np.ndarray) -> "LabelTable":
        """The table of the rows ``rows`` (indices, in the order given), boxes included."""
        rows = np.asarray(rows, dtype=np.int64)
        starts, ends = self.box_offsets[rows], self.box_offsets[rows + 1]
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(ends - starts, out=offsets[1:])
        picked = [np.arange(a, b) for a, b in zip(starts, ends)]
        box_rows = np.concatenate(picked) if picked else np.zeros(0, dtype=np.int64)
        cols = {f.name: getattr(self, f.name)[rows] for f in dataclasses.fields(self)
                if f.name not in ("boxes", "box_offsets")}
        return type(self)(**cols, boxes=self.boxes[box_rows].reshape(-1, 4), box_offsets=offsets)

    @classmethod
    def from_rows(cls, rows: Sequence[LabelRow]) -> "LabelTable":
        """Build from rows in sample order."""
        counts = np.array([len(r.boxes) for r in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        flat = [b for r in rows for b in r.boxes]
        boxes = np.asarray(flat, dtype=np.float32).reshape(-1, 4)
        cols: dict[str, np.ndarray] = {
            f: np.array([getattr(r, f) for r in rows], dtype=object) for f in STRING_FIELDS
        }
        for f, dt in INT_FIELDS.items():
            cols[f] = np.array([getattr(r, f) for r in rows], dtype=dt)
        qa = np.array([r.qa or 0 for r in rows], dtype=QA_DTYPE)
        return cls(**cols, boxes=boxes, box_offsets=offsets, qa=qa)


def write_labels(path: Path | str, table: LabelTable) -> None:
    """Write the table as a zarr v3 group at ``path`` (via a temporary name, then renamed)."""
    with atomic_dir(path) as tmp:
        group = zarr.open_group(tmp, mode="w", zarr_format=3)
        group.attrs["format_version"] = FORMAT_VERSION
        group.attrs["samples"] = len(table)
        n = max(len(table), 1)
        for f in STRING_FIELDS:
            arr = group.create_array(f, shape=(len(table),), dtype=str, chunks=(min(n, CHUNK),))
            if len(table):
                arr[:] = getattr(table, f).astype(np.dtypes.StringDType())
        for f in (*INT_FIELDS, QA_FIELD, "box_offsets"):
            data = getattr(table, f)
            group.create_array(f, data=data, chunks=(min(max(len(data), 1), CHUNK),))
        nb = max(len(table.boxes), 1)
        group.create_array("boxes", data=table.boxes, chunks=(min(nb, CHUNK), 4))


def read_labels(path: Path | str | zarr.abc.store.Store) -> LabelTable:
    """Read the whole label store (a folder, or a zarr store such as ``shards.store``'s remote
    one); raise :class:`FormatError` if an array is missing."""
    try:
        group = zarr.open_group(path if isinstance(path, zarr.abc.store.Store) else Path(path), mode="r")
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
        raise FormatError(f"{path}: no zarr group ({exc})") from exc
    missing = [f for f in ALL_FIELDS if f not in group]
    if missing:
        raise FormatError(f"{path}: missing arrays {missing}")
    cols = {f: group[f][:] for f in ALL_FIELDS}
    cols[QA_FIELD] = np.asarray(group[QA_FIELD][:], dtype=QA_DTYPE) if QA_FIELD in group else None
    for f in STRING_FIELDS:
        cols[f] = np.asarray(cols[f]).astype(object)
    n = len(cols["key"])
    lengths = {f: len(cols[f]) for f in (*STRING_FIELDS, *INT_FIELDS, QA_FIELD) if cols[f] is not None}
    if set(lengths.values()) != {n} or len(cols["box_offsets"]) != n + 1:
        raise FormatError(f"{path}: arrays are not aligned: {lengths}, box_offsets {len(cols['box_offsets'])}")
    return LabelTable(**cols)
