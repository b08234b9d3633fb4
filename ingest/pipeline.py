"""The ingest driver: plan, run one Dask task per shard, then write labels, rejects, manifest."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Set
from importlib import metadata
from pathlib import Path
from typing import Any

from distributed import Client

from ingest.config import IngestConfig
from ingest.journal import reusable_record
from ingest.plan import Plan, ShardTask, make_plan
from ingest.runner import build_shards, lazy_client, read_tags
from ingest.workdir import done_dir, params_file, work_dir
from ingest.worker import mismatch
from shards.archive import ArchiveError, ArchiveIndex, is_archive, read_index, top_folders
from shards.diskspace import free_bytes, human, is_out_of_space, sample_bytes_at_least, what_filled
from shards.format import FORMAT_VERSION, SPLITS
from shards.label_csv import LabelFileError, LabelProblem, PatientLabel, read_label_csv
from shards.labels import LabelRow, LabelTable, write_labels
from shards.manifest import (
    LABELS_NAME,
    MANIFEST_NAME,
    REJECTS_NAME,
    SHARDS_DIR,
    Manifest,
    RunIdentity,
    ShardInfo,
    atomic_write_text,
    sha256_file,
    sync_files,
    write_manifest,
)
from shards.pseudonym import SCHEME, KeyFileError, Pseudonymizer
from shards.records import Reject, ShardRecord
from shards.source import Discovered, discover, members_prefix, patient_id_of, source_fingerprint
from shards.source_index import INDEX_NAME, IndexEntry, SourceIndex, label_digest
from shards.versions import VERSIONS_DIR, recorded_shards

log = logging.getLogger(__name__)

PACKAGES = ("pneumo-hpc", "numpy", "opencv-python-headless", "pydicom", "pylibjpeg", "dask", "distributed", "zarr")

class IngestUsageError(ValueError):
    """Bad input found before any work: the CLI exits 2 with this one-line message."""


class IngestOutOfSpace(RuntimeError):
    """The output's filesystem or quota filled up: the run stopped at once, leaving what a
    resume can trust; the CLI exits 3 with this one-line message."""


@dataclasses.dataclass
class IngestSummary:
    """What a run produced (also printed at the end)."""

    out: Path
    counts: dict[str, Any]
    rejects_by_reason: dict[str, int]
    problems_by_reason: dict[str, int]
    shards_built: int
    shards_reused: int
    seconds: float
    already_complete: bool = False
    skipped: int = 0
    """Input files already in the dataset (an append skips them)."""
    rejected_earlier: int = 0
    """Input files an earlier version rejected for their bytes (an append skips them too)."""
    problems_recorded: int = 0
    """Label problems an append found that the dataset already records (not written again)."""
    version: int | None = None
    """The dataset version an append made (or found complete)."""
    records: list[ShardRecord] = dataclasses.field(default_factory=list, repr=False)
    """Records of the shards built by this run (their ``stats``: timings, worker pid, peak RSS)."""

    def lines(self) -> list[str]:
        c = self.counts
        rate = c["samples"] / self.seconds if self.seconds > 0 and self.shards_built else 0.0
        out = [
            f"dataset: {self.out}",
            f"samples: {c['samples']} (train {c['train']['samples']}, val {c['val']['samples']}); "
            f"positives {c['positives']}; boxes {c['boxes']}",
            f"shards: {self.shards_built} built, {self.shards_reused} reused; {self.seconds:.1f} s"
            + (f", {rate:.1f} images/s" if rate else ""),
            f"rejects: {c['rejects']}" + "".join(f"\n  {r}: {n}" for r, n in sorted(self.rejects_by_reason.items())),
            f"label problems: {c['label_problems']}"
            + "".join(f"\n  {r}: {n}" for r, n in sorted(self.problems_by_reason.items())),
        ]
        if self.version is not None:
            out.insert(1, f"version: {self.version}; skipped {self.skipped} already ingested, "
                          f"{self.rejected_earlier} rejected earlier; {self.problems_recorded} label problems "
                          "already recorded")
        if self.already_complete and self.version is not None:
            earlier = " or was rejected earlier" if self.rejected_earlier else ""
            out.insert(0, f"nothing to append: every input file is already in the dataset{earlier}")
        elif self.already_complete:
            out.insert(0, "already complete: the manifest matches these inputs and parameters; nothing to do")
        return out


def package_versions() -> dict[str, str]:
    out = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _identity(cfg: IngestConfig, inputs: list[tuple[str, int]], pseudonyms: Pseudonymizer | None) -> RunIdentity:
    return RunIdentity.of(
        cfg.dataset_params(),
        # Keyed when pseudonymized: a plain hash of the file names could be checked against guesses.
        pseudonyms.fingerprint_files(inputs) if pseudonyms else source_fingerprint(inputs),
        sha256_file(cfg.labels) if cfg.labels else None,
        key_fingerprint=pseudonyms.fingerprint if pseudonyms else None,
    )


def _pseudonymizer(cfg: IngestConfig) -> Pseudonymizer | None:
    if cfg.pseudonymize is None:
        return None
    try:
        return Pseudonymizer.from_file(cfg.pseudonymize)
    except KeyFileError as exc:
        raise IngestUsageError(str(exc)) from exc


def _check_key(out: Path, previous: str | None, current: str | None) -> None:
    """Refuse to go on with another key (or none) than the one ``out`` was made with."""
    if previous == current:
        return
    if previous is None:
        raise IngestUsageError(f"--out {out} holds a dataset made without --pseudonymize; use a new --out")
    if current is None:
        raise IngestUsageError(f"--out {out} holds a dataset pseudonymized with key {previous[:8]}...; "
                               "give the same --pseudonymize KEYFILE or use a new --out")
    raise IngestUsageError(f"--out {out} holds a dataset pseudonymized with another key ({previous[:8]}..., "
                           f"this one is {current[:8]}...); give that key or use a new --out")


def _check_out(cfg: IngestConfig, identity: RunIdentity) -> bool:
    """Refuse an OUT made with other parameters, inputs or key; True if it is already complete."""
    out = cfg.out
    if not out.exists():
        return False
    if not out.is_dir():
        raise IngestUsageError(f"--out {out} exists and is not a folder")
    if params_file(out).exists():
        previous = RunIdentity.from_json(json.loads(params_file(out).read_text()))
    elif (out / MANIFEST_NAME).exists():
        previous = RunIdentity.from_manifest(json.loads((out / MANIFEST_NAME).read_text()))
    elif any(out.iterdir()):
        raise IngestUsageError(f"--out {out} is not empty and holds no pneumo-hpc dataset; choose an empty folder")
    else:
        return False
    _check_key(out, previous.key_fingerprint, identity.key_fingerprint)
    if (difference := previous.difference(identity)) is not None:
        if (out / VERSIONS_DIR).is_dir() and not params_file(out).exists():
            raise IngestUsageError(f"--out {out} holds a dataset with versions, {difference}; "
                                   "add --append to add these files to it as a new version")
        raise IngestUsageError(f"--out {out} holds a dataset {difference}; use a new --out or delete it")
    return (out / MANIFEST_NAME).exists() and not params_file(out).exists()


def _plan(
    cfg: IngestConfig,
    client: Callable[[], Client],
    inputs: list[tuple[str, int]],
    ignored: int,
    labels: dict[str, PatientLabel] | None,
    problems: list[LabelProblem],
    pseudonyms: Pseudonymizer | None,
    archive: ArchiveIndex | None = None,
    **append: Any,
) -> Plan:
    """The plan, by file names or (``--patient-id tag``) by PatientID tags, with the
    ``patient_id_mismatch`` lines that can be known before decoding; ``append`` holds an
    append's further arguments of :func:`ingest.plan.make_plan`."""
    by_tag = cfg.patient_id == "tag"
    tags = read_tags(cfg, client, [rel for rel, _ in inputs], archive) if by_tag else {}
    plan = make_plan(
        inputs=inputs,
        ignored=ignored,
        patient_ids={rel: tag for rel, (tag, _) in tags.items() if tag} if by_tag else None,
        dicom_dir=cfg.dicom_dir.resolve(),
        out=cfg.out.resolve(),
        labels=labels,
        label_problems=problems,
        shard_size=cfg.shard_size,
        val_fraction=cfg.val_fraction,
        seed=cfg.seed,
        processing=cfg.processing_params(),
        pseudonyms=pseudonyms,
        archive=archive,
        **append,
    )
    plan.rejects.extend(rej for _, rej in tags.values() if rej is not None)
    if not by_tag:  # a renamed file finds no label: show its tag (samples' tags the workers compare)
        tags = read_tags(cfg, client, [r.path for r in plan.rejects if r.reason == "no_label"], archive)
    for rel, (tag, _) in sorted(tags.items()):
        name_id = patient_id_of(rel)
        if tag and tag != name_id:
            plan.problems.append(mismatch(rel, tag, name_id, tag if by_tag else name_id))
    return plan


def read_inputs(cfg: IngestConfig) -> tuple[dict[str, PatientLabel] | None, list[LabelProblem], Discovered]:
    """Check ``--dicom-dir`` and ``--members``, read the labels file and find the inputs.

    Returns:
        the labels by patient id (None without ``--labels``), the label problems found while
        reading them, and the inputs under ``--dicom-dir``.

    Raises:
        IngestUsageError: a ``--dicom-dir`` that is neither a folder nor an archive,
            ``--members`` with a folder, an unreadable labels file or archive.
    """
    archive = is_archive(cfg.dicom_dir)
    if not cfg.dicom_dir.is_dir() and not archive:
        raise IngestUsageError(f"--dicom-dir {cfg.dicom_dir} is neither a folder nor a .zip or .tar archive")
    if cfg.members is not None and not archive:
        raise IngestUsageError(
            f"--members selects a folder inside a .zip or .tar --dicom-dir; {cfg.dicom_dir} is a folder "
            "(name the subfolder as --dicom-dir)"
        )
    labels, problems = None, []
    if cfg.labels is not None:
        try:
            labels, problems = read_label_csv(cfg.labels, cfg.class_info)
        except LabelFileError as exc:
            raise IngestUsageError(str(exc)) from exc
    try:
        found = discover(cfg.dicom_dir, cfg.members)
    except ArchiveError as exc:
        raise IngestUsageError(f"--dicom-dir {exc}") from exc
    return labels, problems, found


def run_ingest(cfg: IngestConfig) -> IngestSummary:
    """Run (or resume) an ingest; see the SPEC for the output it writes.

    Raises:
        IngestUsageError: bad labels file, missing DICOM folder, an OUT made with other
            parameters, that cannot be written or clearly has too little room; raised before
            any decoding.
        IngestOutOfSpace: OUT's filesystem or quota filled up (ENOSPC, EDQUOT): the run
            stops at once; once space is freed the same call resumes.
    """
    t0 = time.perf_counter()
    pseudonyms = _pseudonymizer(cfg)
    labels, problems, found = read_inputs(cfg)
    identity = _identity(cfg, found.inputs, pseudonyms)
    if _check_out(cfg, identity):
        return _summary_from_manifest(cfg.out, t0)
    if not found.inputs:
        where = f" under {cfg.members!r}" if cfg.members else ""
        folders = top_folders(read_index(cfg.dicom_dir)) if is_archive(cfg.dicom_dir) else []
        hint = f"; its top-level folders: {', '.join(folders)}" if folders else ""
        raise IngestUsageError(
            f"--dicom-dir {cfg.dicom_dir}: no DICOM files found{where} (*.dcm or files with the DICOM preamble){hint}"
        )
    _prepare_out(cfg, identity, len(found.inputs))

    plan: Plan | None = None
    records: dict[str, ShardRecord] = {}
    try:
        with contextlib.ExitStack() as stack:
            client = lazy_client(cfg, stack)

            plan = _plan(cfg, client, found.inputs, found.ignored, labels, problems, pseudonyms, found.archive)
            log.info(
                "plan: %d input files (%d other files ignored), %d early rejects, %d shards (shard size %d)",
                len(plan.inputs), plan.ignored, len(plan.rejects), len(plan.tasks), cfg.shard_size,
            )
            records, pending = _reusable(cfg.out, plan.tasks)
            _remove_temporaries(cfg.out)  # those of a stopped run hold room the rest needs
            _check_room(cfg, pending)
            if pending:
                build_shards(cfg, client(), pending, records)
                t_sync = time.perf_counter()
                sync_files([cfg.out / SHARDS_DIR / t.name for t in pending])
                log.debug("synced %d shards to disk in %.1f s", len(pending), time.perf_counter() - t_sync)
        _remove_stale(cfg.out, {t.name for t in plan.tasks})
        summary = _finish(cfg, plan, [records[t.name] for t in plan.tasks], identity, t0, built=len(pending),
                          pseudonyms=pseudonyms)
    except OSError as exc:
        if not is_out_of_space(exc):
            raise
        raise IngestOutOfSpace(_no_space(exc, cfg, plan, records)) from exc
    summary.records = [records[t.name] for t in pending]
    shutil.rmtree(work_dir(cfg.out), ignore_errors=True)
    return summary


def _reusable(out: Path, tasks: list[ShardTask]) -> tuple[dict[str, ShardRecord], list[ShardTask]]:
    """The records of the shards an interrupted run finished, and the tasks still to run."""
    records: dict[str, ShardRecord] = {}
    pending: list[ShardTask] = []
    for task in tasks:
        record = reusable_record(out, task)
        if record is None:
            pending.append(task)
        else:
            records[task.name] = record
    if records:
        log.info("resuming: %d of %d shards already complete", len(records), len(tasks))
    return records, pending


def _prepare_out(cfg: IngestConfig, identity: RunIdentity, inputs: int) -> None:
    """Create OUT's folders and record the run's identity, or refuse an OUT that cannot be written."""
    try:
        done_dir(cfg.out).mkdir(parents=True, exist_ok=True)
        (cfg.out / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
        atomic_write_text(params_file(cfg.out), json.dumps(identity.to_json(), indent=2, sort_keys=True))
    except OSError as exc:
        need = human(inputs * sample_bytes_at_least(cfg.size))
        raise IngestUsageError(f"--out {cfg.out} cannot be written ({exc.strerror or exc}); "
                               f"the {inputs} input files need at least {need} of shards") from exc


def _check_room(cfg: IngestConfig, pending: list[ShardTask]) -> None:
    """Refuse, before any decoding, shards that clearly cannot fit: more than the free space
    even at the least bytes a sample can take (quotas show only when they are met)."""
    samples = sum(len(t.samples) for t in pending)
    need = samples * sample_bytes_at_least(cfg.size)
    free = free_bytes(cfg.out / SHARDS_DIR)
    if need > free:
        raise IngestUsageError(
            f"--out {cfg.out}: {human(free)} free, but the {len(pending)} shards to write ({samples} samples "
            f"at {cfg.size} px) need at least {human(need)}; free space or choose another --out"
        )


def _no_space(exc: OSError, cfg: IngestConfig, plan: Plan | None, records: dict[str, ShardRecord]) -> str:
    """The one line of a run stopped by a full disk or quota: what filled up, and about how
    much more the rest needs (the shards still to write times the mean shard size)."""
    what = what_filled(exc, cfg.out)
    if plan is None:
        return f"{what}; free space and run the same command to resume"
    left = len(plan.tasks) - len(records)
    if left == 0:
        return f"{what} while writing the labels and the manifest; free a little space and run the same command to finish"
    if records:
        mean, how = sum(r.info.bytes for r in records.values()) / len(records), "the mean shard so far"
    else:
        mean, how = cfg.shard_size * sample_bytes_at_least(cfg.size), "at least, estimated"
    return (f"{what}; the {left} of {len(plan.tasks)} shards still to write need about {human(left * mean)} more "
            f"({left} x {human(mean)}, {how}); free space and run the same command to resume")


def _remove_temporaries(out: Path) -> None:
    for path in (out / SHARDS_DIR).iterdir():
        if path.name.startswith(".") and ".tmp-" in path.name:
            path.unlink(missing_ok=True)  # temporary file of a shard stopped mid-write


def _remove_stale(out: Path, names: set[str], kept: Set[str] | None = None) -> None:
    """Delete what ``OUT/shards/`` holds besides the shards ``names``: temporary files of
    shards stopped mid-write, and any other file, which the manifest would not vouch for.
    ``kept`` is ``recorded_shards(out)``, when the caller has read it already."""
    _remove_temporaries(out)
    names = names | (recorded_shards(out) if kept is None else kept)  # a kept version's shards are never stale
    for path in (out / SHARDS_DIR).iterdir():
        if path.name not in names:
            log.warning("removing %s: not part of this dataset's plan", path)
            path.unlink()


@dataclasses.dataclass
class _Outcome:
    """Everything the run found, in the order the output files list it."""

    rows: list[LabelRow]
    shards: list[ShardInfo]
    rejects: list[Reject]
    problems: list[LabelProblem]


def _finish(
    cfg: IngestConfig, plan: Plan, records: list[ShardRecord], identity: RunIdentity, t0: float, built: int,
    pseudonyms: Pseudonymizer | None = None,
) -> IngestSummary:
    """Write labels.zarr, rejects.jsonl and, last, manifest.json from the shards' ``records``
    (in plan order)."""
    outcome = _collect(plan, records)
    counts = _counts(plan, outcome)
    _write_labels(cfg.out, outcome.rows)
    _write_rejects(cfg.out, outcome)
    source_index(plan, records).write(cfg.out / INDEX_NAME)
    write_manifest(cfg.out, _manifest(cfg, plan, identity, counts, outcome.shards, pseudonyms))
    return IngestSummary(
        out=cfg.out, counts=counts, rejects_by_reason=counts["rejects_by_reason"],
        problems_by_reason=counts["label_problems_by_reason"],
        shards_built=built, shards_reused=len(plan.tasks) - built, seconds=time.perf_counter() - t0,
    )


def source_index(plan: Plan, records: list[ShardRecord]) -> SourceIndex:
    """The source index of the samples ``records`` hold (see :mod:`shards.source_index`)."""
    planned = {s.key: s for t in plan.tasks for s in t.samples}
    samples = {}
    for rec in records:
        for meta in rec.metas:
            s = planned[meta["key"]]
            samples[s.key] = IndexEntry(meta["source"]["sha256"], label_digest(s.target, s.class_name, s.boxes))
    return SourceIndex(samples)


def _collect(plan: Plan, records: list[ShardRecord]) -> _Outcome:
    """The label rows and shards in shard order; the rejects and label problems sorted."""
    outcome = _Outcome(rows=[], shards=[], rejects=list(plan.rejects), problems=list(plan.problems))
    for index, rec in enumerate(records):
        outcome.shards.append(rec.info)
        outcome.rows.extend(LabelRow.from_meta(meta, index) for meta in rec.metas)
        outcome.rejects.extend(rec.rejects)
        outcome.problems.extend(rec.problems)
    outcome.rejects.sort(key=lambda r: (r.path, r.reason))
    outcome.problems.sort(key=lambda p: (p.reason, p.patient_id or "", p.path or "", p.line or 0))
    return outcome


def _counts(plan: Plan, outcome: _Outcome) -> dict[str, Any]:
    """The manifest's ``counts``."""
    counts: dict[str, Any] = {s: {"samples": 0, "positives": 0, "boxes": 0, "shards": 0} for s in SPLITS}
    for row in outcome.rows:
        c = counts[row.split]
        c["samples"] += 1
        c["positives"] += row.target == 1
        c["boxes"] += len(row.boxes)
    for info in outcome.shards:
        counts[info.split]["shards"] += 1
    rejects_by = collections.Counter(r.reason for r in outcome.rejects)
    problems_by = collections.Counter(p.reason for p in outcome.problems)
    counts.update(
        samples=len(outcome.rows),
        positives=sum(counts[s]["positives"] for s in SPLITS),
        boxes=sum(counts[s]["boxes"] for s in SPLITS),
        inputs=len(plan.inputs),
        rejects=len(outcome.rejects),
        rejects_by_reason=dict(sorted(rejects_by.items())),
        label_problems=len(outcome.problems),
        label_problems_by_reason=dict(sorted(problems_by.items())),
    )
    return counts


def _write_labels(out: Path, rows: list[LabelRow]) -> None:
    """labels.zarr, synced: the manifest that vouches for it comes after it."""
    labels = out / LABELS_NAME
    write_labels(labels, LabelTable.from_rows(rows))
    sync_files([*sorted(p for p in labels.rglob("*") if p.is_file()), labels])  # and OUT: its parent


def _write_rejects(out: Path, outcome: _Outcome) -> None:
    lines = (json.dumps(r.to_json(), sort_keys=True) + "\n" for r in [*outcome.rejects, *outcome.problems])
    atomic_write_text(out / REJECTS_NAME, "".join(lines))


def _manifest(cfg: IngestConfig, plan: Plan, identity: RunIdentity, counts: dict[str, Any],
              shards: list[ShardInfo], pseudonyms: Pseudonymizer | None) -> Manifest:
    return Manifest(
        format_version=FORMAT_VERSION,
        params=identity.params,
        params_hash=identity.params_hash,
        packages=package_versions(),
        source=_source_record(cfg, plan, identity, pseudonyms),
        counts=counts,
        shards=shards,
    )


def source_entry(cfg: IngestConfig, pseudonyms: Pseudonymizer | None) -> str:
    """What fed a run, as the manifest's ``source.sources`` lists it: the folder's absolute
    path, or the archive's and ``!/`` and the ``--members`` folder inside it (``data.zip!/images/``);
    pseudonymized, that text's pseudonym."""
    text = str(cfg.dicom_dir.resolve())
    if prefix := members_prefix(cfg.members):
        text += "!/" + prefix
    return pseudonyms.file(text) if pseudonyms else text


def _source_record(cfg: IngestConfig, plan: Plan, identity: RunIdentity,
                   pseudonyms: Pseudonymizer | None) -> dict[str, Any]:
    """The manifest's ``source``; pseudonymized, each path is its pseudonym, each file its sha256."""
    def where(path: Path | None) -> str | None:
        if path is None:
            return None
        return pseudonyms.file(path) if pseudonyms else str(path.resolve())

    source = {
        "dicom_dir": where(cfg.dicom_dir),
        "files": len(plan.inputs),
        "fingerprint": identity.source_fingerprint,
        "labels": where(cfg.labels),
        "labels_sha256": identity.labels_sha256,
        "class_info": where(cfg.class_info),
        "sources": [source_entry(cfg, pseudonyms)],
    }
    if pseudonyms:
        source["class_info_sha256"] = sha256_file(cfg.class_info) if cfg.class_info and cfg.class_info.is_file() else None
        source["pseudonym"] = {"scheme": SCHEME, "key_fingerprint": pseudonyms.fingerprint}
    return source


def _summary_from_manifest(out: Path, t0: float) -> IngestSummary:
    m = json.loads((out / MANIFEST_NAME).read_text())
    c = m["counts"]
    return IngestSummary(
        out=out, counts=c, rejects_by_reason=c["rejects_by_reason"], problems_by_reason=c["label_problems_by_reason"],
        shards_built=0, shards_reused=len(m["shards"]), seconds=time.perf_counter() - t0, already_complete=True,
    )
