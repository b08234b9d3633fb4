"""Planning an ingest: which files are inputs, the patient-level split, and the shards.

Everything here runs in the driver and depends only on the file list, the labels and the
seed, never on worker count or timing: the plan, and so every shard's bytes, is the same for
every run over the same inputs.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from collections.abc import Callable, Mapping
from pathlib import Path

from shards.archive import ArchiveIndex
from shards.format import SPLITS, key_for, shard_name
from shards.label_csv import LabelProblem, PatientLabel
from shards.manifest import ProcessingParams
from shards.pseudonym import Pseudonymizer
from shards.records import Reject
from shards.seeds import shard_order_hash, split_hash
from shards.source import patient_id_of, source_fingerprint


@dataclasses.dataclass(frozen=True)
class PlannedSample:
    """A sample to build: source file (relative to the DICOM folder) and its label.

    ``patient_id`` and ``path`` are the real ones (the worker reads the file, compares the
    PatientID tag, and names both in ``rejects.jsonl``); ``recorded_id`` and ``recorded_path``,
    set under ``--pseudonymize``, are what the sample's JSON and ``labels.zarr`` hold instead.
    """

    key: str
    patient_id: str
    path: str
    split: str
    target: int
    class_name: str | None
    boxes: tuple[tuple[float, float, float, float], ...]
    recorded_id: str | None = None
    recorded_path: str | None = None


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """One Dask task: build one whole shard."""

    name: str
    split: str
    index: int
    samples: tuple[PlannedSample, ...]
    dicom_dir: str
    out: str
    processing: ProcessingParams
    archive: ArchiveIndex | None = None
    """When ``dicom_dir`` is an archive: where this shard's samples lie in it."""


@dataclasses.dataclass
class Plan:
    """The result of planning."""

    tasks: list[ShardTask]
    rejects: list[Reject]
    problems: list[LabelProblem]
    inputs: list[tuple[str, int]]
    ignored: int

    @property
    def fingerprint(self) -> str:
        return source_fingerprint(self.inputs)


def assign_splits(patients: dict[str, int], val_fraction: float, seed: int) -> dict[str, str]:
    """Patient-level split stratified by target (-1 = unlabelled is its own stratum).

    Within each stratum patients are ordered by a hash of (seed, patient id) and the first
    ``round(val_fraction * n)`` go to ``val``: the same seed always gives the same split.
    """
    strata: dict[int, list[str]] = defaultdict(list)
    for pid, target in patients.items():
        strata[target].append(pid)
    split: dict[str, str] = {}
    for members in strata.values():
        members.sort(key=lambda p: (split_hash(seed, p), p))
        n_val = round(val_fraction * len(members))
        for i, pid in enumerate(members):
            split[pid] = "val" if i < n_val else "train"
    return split


def make_plan(
    *,
    dicom_dir: Path,
    out: Path,
    labels: dict[str, PatientLabel] | None,
    label_problems: list[LabelProblem],
    shard_size: int,
    val_fraction: float,
    seed: int,
    processing: ProcessingParams,
    inputs: list[tuple[str, int]],
    ignored: int = 0,
    patient_ids: dict[str, str] | None = None,
    pseudonyms: Pseudonymizer | None = None,
    archive: ArchiveIndex | None = None,
    existing: Mapping[str, str] | None = None,
    split_of_new: Callable[[str], str] | None = None,
    first_index: Mapping[str, int] | None = None,
) -> Plan:
    """Turn the file list (from :func:`shards.source.discover`) and the labels into shard
    tasks, early rejects and label problems.

    No file is opened here: a ``*.dcm`` file that is not DICOM is planned like any other and
    rejected (``not_dicom``) by the worker that decodes it.

    Args:
        patient_ids: ``--patient-id tag``: the PatientID of each input by path; an input
            missing from it is left out (the caller rejects it). None: ids from file names.
        pseudonyms: ``--pseudonymize``: keys, the split, the shard order and duplicate keys
            go by each patient's pseudonym; labels are matched by the real id.
        archive: The member index when ``dicom_dir`` is an archive (each task gets its part).
        existing: An append's dataset: its patients' split by sample key. A file of one of
            them is a ``duplicate_key`` reject, and a labelled one is no ``label_without_image``.
        split_of_new: An append's split of a new patient, by the id the dataset records, in
            place of the stratified split.
        first_index: The number of each split's first shard (an append's follow its dataset's).
    """
    existing = existing or {}
    rejects: list[Reject] = []
    problems = list(label_problems)
    chosen: dict[str, str] = {}  # patient id -> path
    by_key: dict[str, str] = {}  # key -> patient id
    for rel, _size in inputs:
        if patient_ids is not None and rel not in patient_ids:
            continue
        pid = patient_ids[rel] if patient_ids is not None else patient_id_of(rel)
        key = key_for(pseudonyms.patient(pid) if pseudonyms else pid)
        if pid in chosen:
            rejects.append(Reject(rel, "duplicate_patient", f"patient {pid} already ingested from {chosen[pid]}"))
        elif key in existing:
            rejects.append(Reject(rel, "duplicate_key", f"key {key} already in the dataset (patient {pid})"))
        elif key in by_key:
            rejects.append(Reject(rel, "duplicate_key", f"key {key} already used by patient {by_key[key]}"))
        elif labels is not None and pid not in labels:
            rejects.append(Reject(rel, "no_label", f"patient {pid} has no row in the labels file"))
        else:
            chosen[pid] = rel
            by_key[key] = pid
    if labels is not None:
        in_dataset = {pid for pid in labels if key_for(pseudonyms.patient(pid) if pseudonyms else pid) in existing}
        for pid in sorted(set(labels) - set(chosen) - in_dataset):
            problems.append(LabelProblem("label_without_image", "labelled patient has no ingestable image file", pid))

    # Every function of the id takes what the dataset records: with a key, the pseudonym.
    shown = {pid: pseudonyms.patient(pid) if pseudonyms else pid for pid in chosen}
    targets = {shown[pid]: (labels[pid].target if labels is not None else -1) for pid in chosen}
    if split_of_new is None:
        split_of = assign_splits(targets, val_fraction, seed)
    else:
        split_of = {p: split_of_new(p) for p in targets}
    tasks: list[ShardTask] = []
    for split in SPLITS:
        pids = sorted((p for p in chosen if split_of[shown[p]] == split),
                      key=lambda p: (shard_order_hash(seed, shown[p]), shown[p]))
        first = (first_index or {}).get(split, 0)
        for index, start in enumerate(range(0, len(pids), shard_size), start=first):
            samples = []
            for pid in pids[start : start + shard_size]:
                label = labels.get(pid) if labels is not None else None
                samples.append(
                    PlannedSample(
                        key=key_for(shown[pid]),
                        patient_id=pid,
                        path=chosen[pid],
                        split=split,
                        target=label.target if label else -1,
                        class_name=label.class_name if label else None,
                        boxes=tuple(label.boxes) if label else (),
                        recorded_id=shown[pid] if pseudonyms else None,
                        recorded_path=pseudonyms.path(chosen[pid]) if pseudonyms else None,
                    )
                )
            tasks.append(
                ShardTask(
                    name=shard_name(split, index),
                    split=split,
                    index=index,
                    samples=tuple(samples),
                    dicom_dir=str(dicom_dir),
                    out=str(out),
                    processing=processing,
                    archive=archive.subset([s.path for s in samples]) if archive is not None else None,
                )
            )
    return Plan(tasks=tasks, rejects=rejects, problems=problems, inputs=inputs, ignored=ignored)
