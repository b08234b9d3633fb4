"""``python -m ingest --append``: add new source files to a dataset as a new version.

The new files become new shards, numbered after the highest shard any kept version lists; no
shard of an earlier version is read or rewritten. What the append reads of the dataset is its
manifest, its label store, its ``rejects.jsonl`` and its source index (:mod:`shards.source_index`;
a dataset made before the index, format 4 or earlier, has its samples' JSON read once instead).

Skipped: a file whose sha256 the index holds (already ingested) or a ``rejects.jsonl`` file line
carries (rejected for its bytes, format 6). Written: only the label problems the parent's
``rejects.jsonl`` does not hold yet.

Splits. Existing patients keep their split. A new patient goes to ``val`` when
``split_hash(seed, id) < val_fraction`` (:func:`shards.seeds.split_hash`, the id being the
one the dataset records: the pseudonym under a key), else to ``train``: a pure function of
(seed, patient id), whatever else the append holds. The first ingest ranks the patients of
each target stratum by the same hash and sends the first ``round(val_fraction * n)`` to
``val``; that is the threshold rule with the threshold moved to the stratum's
``round(val_fraction * n)``-th hash. So the two agree for every patient whose hash is not
between ``val_fraction`` and that stratum's threshold (a few patients near it), the val
share of the appended patients is ``val_fraction`` in expectation (not exactly, and not per
stratum), and one ingest of the union of the files may put those few new patients in the
other split.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Set
from pathlib import Path
from typing import Any

import numpy as np

from ingest.config import IngestConfig
from ingest.pipeline import (
    IngestOutOfSpace,
    IngestSummary,
    IngestUsageError,
    _check_key,
    _check_room,
    _collect,
    _counts,
    _no_space,
    _plan,
    _prepare_out,
    _pseudonymizer,
    _remove_stale,
    _remove_temporaries,
    _reusable,
    package_versions,
    read_inputs,
    source_entry,
    source_index,
)
from ingest.plan import Plan
from ingest.runner import build_shards, lazy_client
from ingest.workdir import params_file, work_dir
from shards.archive import hash_members
from shards.diskspace import is_out_of_space
from shards.format import SHARD_NAME, SPLITS, key_for
from shards.label_csv import LabelProblem
from shards.labels import LabelTable, read_labels
from shards.manifest import (
    LABELS_NAME,
    MANIFEST_NAME,
    REJECTS_NAME,
    SHARDS_DIR,
    Manifest,
    RunIdentity,
    sha256_file,
    sync_files,
)
from shards.pseudonym import Pseudonymizer
from shards.records import ShardRecord
from shards.scan import hash_files
from shards.seeds import split_hash
from shards.source import source_fingerprint
from shards.source_index import SourceIndex, index_from_shards, index_rel, label_digest, read_index
from shards.versions import Change, RecordedShards, VersionRecord, commit_version, read_recorded_shards, save_current

log = logging.getLogger(__name__)

RELABEL = "relabel_needs_rewrite"


def new_patient_split(seed: int, patient_id: str, val_fraction: float) -> str:
    """The split of a patient an append adds (see the module docstring)."""
    return "val" if split_hash(seed, patient_id) < val_fraction else "train"


def run_append(cfg: IngestConfig) -> IngestSummary:
    """Append ``cfg.dicom_dir``'s new files to the dataset at ``cfg.out`` as a new version.

    Raises:
        IngestUsageError: no dataset at OUT, other parameters or another key than OUT's, bad
            inputs; before any decoding.
        IngestOutOfSpace: as :func:`ingest.pipeline.run_ingest`; the same call resumes.
    """
    t0 = time.perf_counter()
    out = cfg.out
    if not (out / MANIFEST_NAME).is_file():
        raise IngestUsageError(f"--append: --out {out} holds no dataset to append to; leave out --append to make one")
    recorded = json.loads((out / MANIFEST_NAME).read_text())
    base = Manifest.from_dict(recorded)
    pseudonyms = _pseudonymizer(cfg)
    previous = RunIdentity.from_manifest(recorded)
    key = pseudonyms.fingerprint if pseudonyms else None
    _check_key(out, previous.key_fingerprint, key)
    asked = RunIdentity.of(cfg.dataset_params(), previous.source_fingerprint, previous.labels_sha256, key_fingerprint=key)
    if (difference := previous.difference(asked)) is not None:
        raise IngestUsageError(f"--append: --out {out} holds a dataset {difference}; "
                               "an append takes the parameters the dataset was made with")
    if (previous.labels_sha256 is None) != (cfg.labels is None):
        made = "with a labels file; give --labels" if cfg.labels is None else "without labels; leave out --labels"
        raise IngestUsageError(f"--append: --out {out} holds a dataset made {made}")
    made_with_classes = recorded.get("source", {}).get("class_info") is not None
    if cfg.labels is not None and made_with_classes != (cfg.class_info is not None):
        # Without it every old patient's stored class would read as a relabel, and the reverse.
        made = ("with a class-info file; give --class-info" if made_with_classes
                else "without a class-info file; leave out --class-info")
        raise IngestUsageError(f"--append: --out {out} holds a dataset made {made}")
    with ThreadPoolExecutor(1, thread_name_prefix="append-index") as pool:
        indexed = pool.submit(read_index, out, base.version)  # while the inputs are listed and hashed
        labels, problems, found = read_inputs(cfg)
        parent_lines = (out / REJECTS_NAME).read_text().splitlines(True)
        rels = [rel for rel, _ in found.inputs]
        hashes = hash_members(found.archive.subset(rels)) if found.archive else hash_files(cfg.dicom_dir, rels)
        index = indexed.result()
    if index is None:
        log.info("append: %s was made before the source index; reading its samples' JSON once", out)
        index = index_from_shards(out, [s.name for s in base.shards])
    known, judged = index.files(), _judged(parent_lines)
    inputs = [(rel, size) for rel, size in found.inputs if hashes[rel] not in known and hashes[rel] not in judged]
    skipped = sum(hashes[rel] in known for rel in rels)
    rejected_earlier = len(found.inputs) - len(inputs) - skipped
    if not inputs:
        return _nothing_new(out, base, skipped, rejected_earlier, t0)

    identity = RunIdentity.of(
        cfg.dataset_params(),
        pseudonyms.fingerprint_files(inputs) if pseudonyms else source_fingerprint(inputs),
        sha256_file(cfg.labels) if cfg.labels else None,
        key_fingerprint=key,
    )
    if params_file(out).exists():
        stopped = RunIdentity.from_json(json.loads(params_file(out).read_text()))
        if (difference := stopped.difference(identity)) is not None:
            raise IngestUsageError(f"--out {out} holds a stopped run {difference}; "
                                   "run that command again to finish it first")
    resuming = params_file(out).exists()
    _prepare_out(cfg, identity, len(inputs))

    plan: Plan | None = None
    records: dict[str, ShardRecord] = {}
    pending = []
    finisher = ThreadPoolExecutor(1, thread_name_prefix="append-commit")
    try:
        with contextlib.ExitStack() as stack:
            client = lazy_client(cfg, stack)

            # What the plan needs of the dataset (its records, its label store, the relabels)
            # is read on a thread while the cluster starts here: the read grows with the
            # dataset, the start does not, and most of a start is waiting for the workers. A
            # resumed append may find every shard built already and need no cluster at all.
            with ThreadPoolExecutor(1, thread_name_prefix="append-read") as pool:
                reading = pool.submit(_read_parent, out, base, labels, index, pseudonyms)
                if not resuming:
                    client()
                parent, listed, table, existing, relabels = reading.result()
            problems = [*problems, *relabels]
            plan = _plan(cfg, client, inputs, found.ignored, labels, problems, pseudonyms, found.archive,
                         existing=existing, first_index=_first_index(base, listed.every),
                         split_of_new=lambda pid: new_patient_split(cfg.seed, pid, cfg.val_fraction))
            log.info("append: %d new files (%d already in the dataset, %d rejected earlier), %d shards",
                     len(inputs), skipped, rejected_earlier, len(plan.tasks))
            records, pending = _reusable(out, plan.tasks)
            _remove_temporaries(out)
            _check_room(cfg, pending)
            if pending:
                build_shards(cfg, client(), pending, records)
                sync_files([out / SHARDS_DIR / t.name for t in pending])
            # The new version is written on a thread while the cluster stops here (mostly
            # waiting for its workers to exit): nothing of it needs the cluster any more.
            committing = finisher.submit(_finish, out, cfg, plan, records, listed, base, parent, parent_lines, table,
                                     index, identity, pseudonyms, t0, len(pending))
        summary = committing.result()
        summary.skipped, summary.rejected_earlier = skipped, rejected_earlier
    except OSError as exc:
        if not is_out_of_space(exc):
            raise
        raise IngestOutOfSpace(_no_space(exc, cfg, plan, records)) from exc
    finally:
        finisher.shutdown()  # a commit under way ends before anything leaves this call
    summary.records = [records[t.name] for t in pending]
    shutil.rmtree(work_dir(out), ignore_errors=True)
    return summary


def _finish(out: Path, cfg: IngestConfig, plan: Plan, records: dict[str, ShardRecord], listed: RecordedShards,
            base: Manifest, parent: VersionRecord, parent_lines: list[str], table: LabelTable, index: SourceIndex,
            identity: RunIdentity, pseudonyms: Pseudonymizer | None, t0: float, built: int) -> IngestSummary:
    """Remove what no kept version references and commit the new version (see :func:`_commit`)."""
    _remove_stale(out, {t.name for t in plan.tasks}, listed.kept)
    return _commit(cfg, plan, [records[t.name] for t in plan.tasks], base, parent, parent_lines, table, index,
                   identity, pseudonyms, t0, built=built)


def _read_parent(out: Path, base: Manifest, labels: dict | None, index: SourceIndex,
                 pseudonyms: Pseudonymizer | None,
                 ) -> tuple[VersionRecord, RecordedShards, LabelTable, dict[str, str], list[LabelProblem]]:
    """What an append needs of the dataset it extends: the latest version's record (written
    first for a dataset without one, before any clean-up: its shards become kept), the shards
    its versions record, its label store, each stored sample's split, and the label problems
    of patients whose labels the labels file changes."""
    parent = save_current(out, base)
    table = read_labels(out / LABELS_NAME)
    existing = {str(k): str(s) for k, s in zip(table.key, table.split)}
    relabels = _relabels(labels, index, pseudonyms) if labels is not None else []
    return parent, read_recorded_shards(out), table, existing, relabels


def _relabels(labels: dict, index: SourceIndex, pseudonyms: Pseudonymizer | None) -> list[LabelProblem]:
    """A ``relabel_needs_rewrite`` problem for each patient in the dataset whose label differs."""
    out = []
    for pid, label in labels.items():
        recorded = index.samples.get(key_for(pseudonyms.patient(pid) if pseudonyms else pid))
        if recorded is not None and recorded.label and recorded.label != label_digest(label.target, label.class_name, label.boxes):
            out.append(LabelProblem(RELABEL, "the labels file changes the label of a patient already in the "
                                    "dataset; an append does not apply it (a relabel needs a new ingest)", pid))
    return sorted(out, key=lambda p: p.patient_id)


def _judged(lines: list[str]) -> set[str]:
    """The sha256 of each file a ``rejects.jsonl`` rejects for its bytes: the same bytes under the
    same parameters get the same verdict. A line without one (written before format 6, or a
    verdict that does not follow from the bytes: ``no_label``, ``worker_crashed``, ...) names none,
    so its file is processed again."""
    out = set()
    for line in lines:
        entry = json.loads(line)
        if entry.get("kind") == "file" and entry.get("sha256"):
            out.add(entry["sha256"])
    return out


def _problem_identity(problem: dict[str, Any]) -> tuple[str, str | None, str]:
    """What makes two label problems the same one: the reason, the patient and the detail, not
    the labels file's path nor its line (a later CSV keeps the old rows, in any order)."""
    return problem["reason"], problem.get("patient_id"), problem["detail"]


def _new_problems(problems: list[LabelProblem], recorded_lines: list[str]) -> tuple[list[LabelProblem], int]:
    """The ``problems`` that ``recorded_lines`` (the parent's ``rejects.jsonl``) do not hold yet,
    and how many they do; a problem found twice needs two recorded lines to count as recorded."""
    recorded = collections.Counter(_problem_identity(e) for line in recorded_lines
                                   if (e := json.loads(line)).get("kind") == "label")
    new = []
    for problem in problems:
        identity = _problem_identity(problem.to_json())
        if recorded[identity]:
            recorded[identity] -= 1
        else:
            new.append(problem)
    return new, len(problems) - len(new)


def _first_index(base: Manifest, recorded: Set[str]) -> dict[str, int]:
    """Each split's first new shard number: after the highest that any version ever listed
    (``recorded``, and ``base``'s; a number is never used twice, so a node cache can never hold
    other bytes under a name)."""
    top = {split: -1 for split in SPLITS}
    for name in recorded | {s.name for s in base.shards}:
        if m := SHARD_NAME.match(name):
            top[m.group(1)] = max(top[m.group(1)], int(m.group(2)))
    return {split: n + 1 for split, n in top.items()}


def _concat(a: LabelTable, b: LabelTable, shard_offset: int) -> LabelTable:
    cols = {}
    for f in dataclasses.fields(LabelTable):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "shard":
            y = y + shard_offset
        elif f.name == "box_offsets":
            x, y = x[:-1], y + x[-1]
        cols[f.name] = np.concatenate([x, y])
    return LabelTable(**cols)


def _merge_counts(base: dict[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    counts = dict(base)
    for k in ("samples", "positives", "boxes", "inputs", "rejects", "label_problems"):
        counts[k] = base.get(k, 0) + new.get(k, 0)
    for split in SPLITS:
        counts[split] = {k: base[split][k] + new[split][k] for k in base[split]}
    for k in ("rejects_by_reason", "label_problems_by_reason"):
        merged = dict(base.get(k, {}))
        for reason, n in new.get(k, {}).items():
            merged[reason] = merged.get(reason, 0) + n
        counts[k] = dict(sorted(merged.items()))
    return counts


def _commit(cfg: IngestConfig, plan: Plan, records: list[ShardRecord], base: Manifest, parent: VersionRecord,
            parent_lines: list[str], table: LabelTable, index: SourceIndex, identity: RunIdentity,
            pseudonyms: Pseudonymizer | None, t0: float, built: int) -> IngestSummary:
    """Write the new version: the index, then (``commit_version``) labels, rejects, manifest.
    ``parent_lines`` are the parent's ``rejects.jsonl`` lines, ``table`` its label store (both as
    ``run_append`` read them)."""
    out = cfg.out
    outcome = _collect(plan, records)
    # A patient who now has a sample leaves the parent's label_without_image lines.
    now = {s.patient_id for t in plan.tasks for s in t.samples}
    kept_lines = [line for line in parent_lines if not (
        (entry := json.loads(line)).get("reason") == "label_without_image" and entry.get("patient_id") in now)]
    dropped = len(parent_lines) - len(kept_lines)
    outcome.problems, recorded = _new_problems(outcome.problems, kept_lines)
    new_counts = _counts(plan, outcome)
    counts = _merge_counts(base.counts, new_counts)
    counts["label_problems"] -= dropped
    by = dict(counts["label_problems_by_reason"])
    if dropped:
        by["label_without_image"] -= dropped
        if by["label_without_image"] == 0:
            del by["label_without_image"]
    counts["label_problems_by_reason"] = by
    lines = [*kept_lines, *(json.dumps(r.to_json(), sort_keys=True) + "\n" for r in [*outcome.rejects, *outcome.problems])]
    table = _concat(table, LabelTable.from_rows(outcome.rows), len(base.shards))

    def where(path: Path | None) -> str | None:
        if path is None:
            return None
        return pseudonyms.file(path) if pseudonyms else str(path.resolve())

    sources = list(base.source.get("sources") or [base.source.get("dicom_dir")])
    source = {**base.source, "dicom_dir": where(cfg.dicom_dir), "files": base.source.get("files", 0) + len(plan.inputs),
              "fingerprint": identity.source_fingerprint, "labels": where(cfg.labels),
              "labels_sha256": identity.labels_sha256, "class_info": where(cfg.class_info),
              "sources": [*sources, source_entry(cfg, pseudonyms)]}
    manifest = dataclasses.replace(base, shards=[*base.shards, *outcome.shards], counts=counts, source=source,
                                   packages=package_versions())
    index.merged(source_index(plan, records)).write(out / index_rel(base.version + 1))
    patients = len({s.patient_id for t in plan.tasks for s in t.samples})
    change = Change(kind="append", patients=patients, samples=len(outcome.rows),
                    shards_added=tuple(s.name for s in outcome.shards))
    commit_version(out, parent, manifest, table, lines, change)
    return IngestSummary(out=out, counts=counts, rejects_by_reason=counts["rejects_by_reason"],
                         problems_by_reason=counts["label_problems_by_reason"], shards_built=built,
                         shards_reused=len(plan.tasks) - built, seconds=time.perf_counter() - t0,
                         problems_recorded=recorded, version=base.version + 1)


def _nothing_new(out: Path, base: Manifest, skipped: int, rejected_earlier: int, t0: float) -> IngestSummary:
    c = base.counts
    return IngestSummary(out=out, counts=c, rejects_by_reason=c["rejects_by_reason"],
                         problems_by_reason=c["label_problems_by_reason"], shards_built=0, shards_reused=0,
                         seconds=time.perf_counter() - t0, already_complete=True, skipped=skipped,
                         rejected_earlier=rejected_earlier, version=base.version)
