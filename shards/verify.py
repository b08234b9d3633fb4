"""Integrity checks of an ingested dataset (``python -m shards verify``).

Three depths, each including the one before:

* **quick** (default): the manifest is well formed and its parameter hash holds; every listed
  shard exists (and no other file sits in ``shards/``) with the recorded size and sha256;
  each shard is a well-formed tar of safe member names pairing up per key (``.npy`` +
  ``.json``); keys are unique across shards; per-shard and per-split counts, first and last
  keys agree with the manifest; each sample member hashes to the manifest's per-sample xxh3-128
  (format 2 on: the digests the loader checks every read against); ``rejects.jsonl`` parses and
  agrees with the manifest counts. Each shard is hashed and parsed in one pass over its bytes
  (:func:`scan_shard`).
* **deep** (``deep=True``): also decodes every image (uint8, size x size, never unpickled),
  checks each JSON (fields exactly :data:`~shards.format.META_FIELDS`, values, boxes inside
  the image, letterbox transform) and compares it with its ``labels.zarr`` row.
* **source** (``source=DIR`` and/or ``labels=CSV``): every input file under DIR (as the
  ingest discovers them) is exactly one sample or one rejects line, sample source sha256s
  match the files, and every labelled patient is a sample, a file reject or a
  ``label_without_image`` problem. A pseudonymized dataset (``--pseudonymize``) holds only
  pseudonyms of paths and ids: these checks need its key (``pseudonymize=KEYFILE``) to map
  the source files and labelled patients onto them; without it they are left out, with a note.
  DIR may be the ``.zip`` or ``.tar`` that was ingested in place (with ``members``, the
  folder inside it).

Each problem found is a :class:`~shards.report.Problem` (shard, key, what is wrong, what was
expected; the checks are listed in :data:`~shards.report.CHECKS`); nothing is raised for
damaged data. This module is the driver: shards are scanned (:mod:`shards.scan`) in parallel
on a Dask ``LocalCluster``, one task per shard (``workers=1`` scans in this process), and the
dataset-level checks are :mod:`shards.crosschecks`.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from shards import crosschecks
from shards.archive import ArchiveError, hash_members, is_archive
from shards.format import FormatError
from shards.label_csv import LabelFileError, PatientLabel, read_label_csv
from shards.manifest import (
    LABELS_NAME,
    MANIFEST_NAME,
    REJECTS_NAME,
    SHARDS_DIR,
    WORK_DIR,
    Manifest,
    read_manifest,
    sha256_file,
)
from shards.pseudonym import KeyFileError, Pseudonymizer
from shards.report import Problem, VerifyReport
from shards.scan import ShardScan, hash_files, scan_shard
from shards.source import discover, source_fingerprint
from shards.versions import VERSIONS_DIR, kept_shards, list_records

log = logging.getLogger(__name__)

SOURCE_BATCH = 64
"""Source files hashed per task."""


class VerifyUsageError(ValueError):
    """Input that cannot be verified at all (no such folder, not a dataset, bad labels file)."""


@dataclasses.dataclass(kw_only=True)
class VerifyConfig:
    """What to verify and how; ``python -m shards verify`` flags map onto these fields."""

    out: Path
    """The dataset folder (holding ``manifest.json``, ``shards/``, ``labels.zarr``)."""
    deep: bool = False
    """Also decode every sample and check it against ``labels.zarr``."""
    source: Path | None = None
    """The DICOM folder (or ``.zip``/``.tar``) that was ingested: check every input file is accounted for."""
    members: str | None = None
    """The folder inside a ``source`` archive that was ingested (``--members``)."""
    labels: Path | None = None
    """The labels CSV that was ingested: check every labelled patient is accounted for."""
    pseudonymize: Path | None = None
    """The key file a pseudonymized dataset was made with, to reconcile it with ``source`` and ``labels``."""
    workers: int | None = None
    """Dask worker processes (default: all cores); 1 scans in this process."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.source = Path(self.source) if self.source is not None else None
        self.labels = Path(self.labels) if self.labels is not None else None
        self.pseudonymize = Path(self.pseudonymize) if self.pseudonymize is not None else None
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers={self.workers}; must be >= 1")

    @property
    def mode(self) -> str:
        """``quick`` or ``deep``, plus ``+source`` / ``+labels``."""
        mode = "deep" if self.deep else "quick"
        return mode + ("+source" if self.source else "") + ("+labels" if self.labels else "")


# --------------------------------------------------------------------------- driver


@dataclasses.dataclass
class _Call:
    fn: Callable[..., Any]
    kwargs: dict[str, Any]
    weight: int
    tag: str


def _run_calls(calls: list[_Call], workers: int, progress: bool, started: list[float]) -> Iterator[tuple[_Call, Any]]:
    """Run the calls (one Dask task each, or in this process) and yield results as they finish.

    Appends to ``started`` the time the first call was submitted (after any cluster start-up).
    """
    from tqdm import tqdm

    bar = tqdm(total=sum(c.weight for c in calls), unit="B", unit_scale=True, unit_divisor=1024,
               desc="verify", disable=not progress, file=sys.stderr, smoothing=0.1)
    try:
        if workers <= 1 or len(calls) <= 1:
            started.append(time.perf_counter())
            for call in calls:
                result = call.fn(**call.kwargs)
                bar.update(call.weight)
                yield call, result
            return
        from distributed import Client, LocalCluster, as_completed

        n = min(workers, len(calls))
        with LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                          silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
            log.info("local Dask cluster: %d worker process(es)", n)
            started.append(time.perf_counter())
            futures = {client.submit(c.fn, **c.kwargs, key=f"verify-{c.tag}", pure=False): c for c in calls}
            for future in as_completed(futures):
                call = futures[future]
                bar.update(call.weight)
                yield call, future.result()
    finally:
        bar.close()


def verify(cfg: VerifyConfig) -> VerifyReport:
    """Verify a dataset folder; see the module docstring for what each mode checks.

    Raises:
        VerifyUsageError: ``out`` is missing or holds no dataset, ``source`` is not a folder,
            or the labels CSV cannot be read. Damage to the dataset never raises: it is
            reported as :class:`Problem` values.
    """
    t0 = time.perf_counter()
    out = cfg.out
    if not out.is_dir():
        raise VerifyUsageError(f"{out}: {'not a folder' if out.exists() else 'no such folder'}")
    if not any((out / n).exists() for n in (MANIFEST_NAME, SHARDS_DIR, LABELS_NAME, REJECTS_NAME)):
        raise VerifyUsageError(f"{out} holds no dataset (no {MANIFEST_NAME}, {SHARDS_DIR}/ or {LABELS_NAME})")
    if cfg.source is not None and not cfg.source.is_dir() and not is_archive(cfg.source):
        raise VerifyUsageError(f"--source {cfg.source} is neither a folder nor a .zip or .tar archive")
    if cfg.members is not None and (cfg.source is None or not is_archive(cfg.source)):
        raise VerifyUsageError("--members selects a folder inside a .zip or .tar --source")
    patient_labels = _load_label_csv(cfg.labels) if cfg.labels is not None else None
    try:
        pseudonyms = Pseudonymizer.from_file(cfg.pseudonymize) if cfg.pseudonymize is not None else None
    except KeyFileError as exc:
        raise VerifyUsageError(str(exc)) from exc
    workers = cfg.workers or os.cpu_count() or 1
    report = VerifyReport(out=out, mode=cfg.mode, problems=[], workers=workers)
    problems = report.problems

    if (out / WORK_DIR).exists():
        problems.append(Problem("ingest_unfinished", f"{WORK_DIR}/ exists: an ingest is running or was killed; "
                                "re-run the ingest to finish", where=str(out)))
    try:
        manifest = read_manifest(out)
    except FileNotFoundError:
        problems.append(Problem("manifest_unreadable", "no manifest.json (the ingest did not finish)",
                                where="manifest"))
        return _done(report, t0)
    except (FormatError, OSError, ValueError) as exc:  # ValueError: e.g. "counts" not an object
        problems.append(Problem("manifest_unreadable", str(exc), where="manifest"))
        return _done(report, t0)
    reconcile = _pseudonym_check(manifest, cfg, pseudonyms, report)
    size = crosschecks.check_manifest(manifest, problems)
    if not all(crosschecks.usable(s) for s in manifest.shards):
        return _done(report, t0)  # a shard list with wrong field types (reported) cannot guide the scan

    present = crosschecks.shard_files(out, manifest, problems, _other_versions_shards(out, manifest, problems))
    calls = _shard_calls(manifest, present, size, cfg, problems)
    inputs: list[tuple[str, int]] = []
    if cfg.source is not None and reconcile:
        try:
            found = discover(cfg.source, cfg.members)
        except ArchiveError as exc:
            raise VerifyUsageError(f"--source {exc}") from exc
        inputs = found.inputs
        for i in range(0, len(inputs), SOURCE_BATCH):
            batch = inputs[i : i + SOURCE_BATCH]
            rels = [r for r, _ in batch]
            fn, kwargs = (hash_files, dict(root=str(cfg.source), rels=rels)) if found.archive is None else (
                hash_members, dict(index=found.archive.subset(rels)))
            calls.append(_Call(fn, kwargs, sum(s for _, s in batch), f"source-{i}"))

    scans: dict[str, ShardScan] = {}
    source_sha: dict[str, str] = {}
    started: list[float] = []
    for call, result in _run_calls(calls, workers, cfg.progress, started):
        if isinstance(result, ShardScan):
            scans[call.tag] = result
        else:
            source_sha.update(result)
    report.scan_seconds = time.perf_counter() - started[0] if started else 0.0

    for info in manifest.shards:
        scan = scans.get(info.name)
        if scan is None:
            continue
        problems.extend(crosschecks.shard_vs_manifest(scan, info))
        problems.extend(scan.problems)
    scans_in_order = [scans[s.name] for s in manifest.shards if s.name in scans]
    report.shards = len(scans_in_order)
    report.samples = sum(len(s.keys) for s in scans_in_order)
    report.bytes = sum(s.bytes for s in scans_in_order)
    report.source_files = len(source_sha)
    problems.extend(crosschecks.cross_shard(manifest, scans))
    rejects = crosschecks.read_rejects(out, manifest, problems)
    if cfg.deep:
        problems.extend(crosschecks.check_labels_zarr(out, manifest, scans))
    if reconcile and pseudonyms is not None:
        manifest, scans_in_order = _unmask(manifest, scans_in_order, pseudonyms, inputs, patient_labels)
    if cfg.source is not None and reconcile:
        problems.extend(crosschecks.check_source(cfg.source, inputs, manifest, scans_in_order, rejects, source_sha))
    if patient_labels is not None and reconcile:
        problems.extend(crosschecks.check_patients(cfg.labels, patient_labels, manifest, scans_in_order, rejects))
    return _done(report, t0)


def _pseudonym_check(m: Manifest, cfg: VerifyConfig, pseudonyms: Pseudonymizer | None,
                     report: VerifyReport) -> bool:
    """Whether the source and labels checks can run: a pseudonymized dataset needs its key.

    Raises:
        VerifyUsageError: a key for a dataset made without one, or another key than its own.
    """
    recorded = (m.source.get("pseudonym") or {}).get("key_fingerprint")
    if pseudonyms is not None:
        if recorded is None:
            raise VerifyUsageError(f"{cfg.out} is not pseudonymized; verify it without --pseudonymize")
        if recorded != pseudonyms.fingerprint:
            raise VerifyUsageError(f"--pseudonymize {cfg.pseudonymize} is not the key {cfg.out} was made with "
                                   f"(key fingerprint {pseudonyms.fingerprint[:8]}..., the dataset's {recorded[:8]}...)")
        return True
    if recorded is not None and (cfg.source is not None or cfg.labels is not None):
        report.notes.append("the dataset is pseudonymized: --source and --labels need its --pseudonymize KEYFILE "
                            "to be reconciled; checked everything else")
        return False
    return True


def _unmask(m: Manifest, scans: list[ShardScan], pseudonyms: Pseudonymizer, inputs: list[tuple[str, int]],
            patient_labels: tuple[dict[str, PatientLabel], str] | None) -> tuple[Manifest, list[ShardScan]]:
    """The manifest and scans with each pseudonym that the key maps a source file or labelled
    patient to replaced by that file's path or patient's id, so that the plain checks apply."""
    path_of = {pseudonyms.path(rel): rel for rel, _ in inputs}
    pid_of = {pseudonyms.patient(pid): pid for pid in (patient_labels[0] if patient_labels else {})}
    unmasked = []
    for scan in scans:
        records = []
        for meta in scan.records:
            meta = dict(meta)
            src = meta.get("source")
            if isinstance(src, dict) and src.get("path") in path_of:
                meta["source"] = {**src, "path": path_of[src["path"]]}
            if meta.get("patient_id") in pid_of:
                meta["patient_id"] = pid_of[meta["patient_id"]]
            records.append(meta)
        unmasked.append(dataclasses.replace(scan, records=records))
    source = dict(m.source)
    if inputs and source.get("fingerprint") == pseudonyms.fingerprint_files(inputs):
        source["fingerprint"] = source_fingerprint(inputs)  # the keyed one holds
    return dataclasses.replace(m, source=source), unmasked


def _other_versions_shards(out: Path, m: Manifest, problems: list[Problem]) -> frozenset[str]:
    """The shards that the dataset's other readable versions list: not strays in ``shards/``
    (a folder without ``versions/`` holds one version: a dataset made before versions existed,
    or the view of one version that ``OUT@vN`` reads)."""
    if m.version == 1 or not (out / VERSIONS_DIR).is_dir():
        return frozenset()
    try:
        return frozenset(kept_shards(list_records(out, m)))
    except (FileNotFoundError, FormatError, ValueError) as exc:
        problems.append(Problem("manifest_unreadable", f"version records: {exc}", where="versions"))
        return frozenset()


def _shard_calls(m: Manifest, present: dict[str, Path], size: int | None, cfg: VerifyConfig,
                 problems: list[Problem]) -> list[_Call]:
    """One scan per listed shard that is present; sizes that differ from the manifest are reported."""
    keep = cfg.deep or cfg.source is not None or cfg.labels is not None
    calls: list[_Call] = []
    queued: set[str] = set()
    for info in m.shards:
        path = present.get(info.name)
        if path is None or info.name in queued:
            continue
        queued.add(info.name)
        try:
            actual = path.stat().st_size
        except OSError:
            actual = -1
        if actual != info.bytes:
            problems.append(Problem("shard_size", f"{actual} bytes", f"{info.bytes} bytes", shard=info.name))
        kwargs = dict(path=str(path), split=info.split, size=size, deep=cfg.deep, keep_records=keep,
                      digests=info.xxh3 is not None, format_version=m.format_version)
        calls.append(_Call(scan_shard, kwargs, max(actual, 0), info.name))
    return calls


def _done(report: VerifyReport, t0: float) -> VerifyReport:
    report.seconds = time.perf_counter() - t0
    if report.problems:
        log.info("verify found %d problem(s)", len(report.problems))
    return report


def _load_label_csv(path: Path) -> tuple[dict[str, PatientLabel], str]:
    try:
        labels, _problems = read_label_csv(path)
    except LabelFileError as exc:
        raise VerifyUsageError(f"--labels: {exc}") from exc
    return labels, sha256_file(path)
