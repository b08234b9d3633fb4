"""Integrity checks of an ingested dataset (``python -m shards verify``).

Three depths, each including the one before:

* **quick** (default): the manifest is well formed and its parameter hash holds; every listed
  shard exists (and no other file sits in ``shards/``) with the recorded size and sha256;
  each shard is a well-formed tar of safe member names pairing up per key (``.npy`` +
  ``.json``); keys are unique across shards; per-shard and per-split counts, first and last
  keys agree with the manifest; ``rejects.jsonl`` parses and agrees with the manifest counts.
  Each shard is hashed and parsed in one pass over its bytes (:func:`scan_shard`).
* **deep** (``deep=True``): also decodes every image (uint8, size x size, never unpickled),
  checks each JSON (fields exactly :data:`~shards.format.META_FIELDS`, values, boxes inside
  the image, letterbox transform) and compares it with its ``labels.zarr`` row.
* **source** (``source=DIR`` and/or ``labels=CSV``): every input file under DIR (as the
  ingest discovers them) is exactly one sample or one rejects line, sample source sha256s
  match the files, and every labelled patient is a sample, a file reject or a
  ``label_without_image`` problem.

Each problem found is a :class:`Problem` (shard, key, what is wrong, what was expected);
nothing is raised for damaged data. Shards are scanned in parallel on a Dask
``LocalCluster``, one task per shard (``workers=1`` scans in this process).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from shards.format import (
    CLASS_NAMES,
    SPLITS,
    FormatError,
)
from shards.label_csv import LabelFileError, PatientLabel, read_label_csv
from shards.labels import LabelTable, read_labels
from shards.manifest import (
    LABELS_NAME,
    MANIFEST_NAME,
    REJECTS_NAME,
    SHARDS_DIR,
    WORK_DIR,
    Manifest,
    ShardInfo,
    params_hash,
    read_manifest,
    sha256_file,
)
from shards.scan import HEX64, Problem, ShardScan, fmt_boxes, hash_files, scan_shard

log = logging.getLogger(__name__)

SOURCE_BATCH = 64
"""Source files hashed per task."""

CHECKS = {
    "manifest_unreadable": "manifest.json is missing, not JSON, or lacks required fields",
    "manifest_field": "a manifest field has a wrong type or value",
    "params_hash": "params_hash is not the hash of the recorded processing parameters",
    "manifest_counts": "the manifest's counts disagree with its own shard list",
    "ingest_unfinished": "the ingest's scratch folder is still there: a run is going on or was killed",
    "shard_missing": "a shard listed in the manifest is not in shards/",
    "shard_unlisted": "a file in shards/ that the manifest does not list",
    "shard_unreadable": "a shard file cannot be opened or read",
    "shard_size": "a shard's size differs from the manifest",
    "shard_sha256": "a shard's sha256 differs from the manifest",
    "tar_header": "a damaged tar header (bad checksum or fields)",
    "tar_truncated": "the shard ends before its tar archive does",
    "tar_trailer": "non-zero bytes after the end-of-archive marker",
    "tar_member": "a member that is not a regular file or not a sample member",
    "member_name": "an unsafe or malformed member name",
    "pairing": "a sample without both its .npy and .json, or with a member twice",
    "duplicate_key": "a key that occurs more than once across the shards",
    "shard_count": "a shard's sample count or first/last key differs from the manifest",
    "split_count": "a split's samples, positives or boxes differ from the manifest counts",
    "image": "an .npy member that does not decode to a uint8 size x size image",
    "meta": "a .json member that does not parse or names another key or split",
    "meta_fields": "a .json member whose fields are not exactly META_FIELDS",
    "meta_value": "a .json field with a wrong type or value",
    "box_outside": "a box not inside the image or with no area",
    "transform": "a letterbox transform inconsistent with the image size or the source geometry",
    "labels_unreadable": "labels.zarr is missing or malformed",
    "labels_count": "labels.zarr has a different number of rows than the manifest has samples",
    "labels_row_missing": "a sample without a labels.zarr row",
    "labels_row_extra": "a labels.zarr row without a sample",
    "labels_mismatch": "a labels.zarr row disagrees with its sample's JSON",
    "labels_order": "labels.zarr rows are not in the shards' sample order",
    "rejects_unreadable": "rejects.jsonl is missing or has a malformed line",
    "rejects_counts": "rejects.jsonl disagrees with the manifest counts",
    "source_fingerprint": "the source file list (paths and sizes) differs from the ingested one",
    "source_missing": "a sample or reject whose source file is not in the source folder",
    "source_unaccounted": "a source file that is neither a sample nor a rejects line",
    "source_twice": "a source file that is more than one sample or rejects line",
    "source_sha256": "a source file whose sha256 differs from its sample's",
    "source_unreadable": "a source file that cannot be read",
    "labels_file_changed": "the labels CSV differs from the one ingested",
    "patient_unaccounted": "a labelled patient that is no sample, file reject or label problem",
    "label_mismatch": "a sample whose patient or target disagrees with the labels CSV",
}
"""Every problem ``check`` name, with what it means."""

_SHARD_NAME = re.compile(r"^(train|val)-(\d{6})\.tar$")


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
    """The DICOM folder that was ingested: check every input file is accounted for."""
    labels: Path | None = None
    """The labels CSV that was ingested: check every labelled patient is accounted for."""
    workers: int | None = None
    """Dask worker processes (default: all cores); 1 scans in this process."""
    progress: bool = True
    """Show a progress bar on stderr."""

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        self.source = Path(self.source) if self.source is not None else None
        self.labels = Path(self.labels) if self.labels is not None else None
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers={self.workers}; must be >= 1")

    @property
    def mode(self) -> str:
        """``quick`` or ``deep``, plus ``+source`` / ``+labels``."""
        mode = "deep" if self.deep else "quick"
        return mode + ("+source" if self.source else "") + ("+labels" if self.labels else "")


@dataclasses.dataclass
class VerifyReport:
    """The outcome of :func:`verify`."""

    out: Path
    mode: str
    problems: list[Problem]
    shards: int = 0
    """Shard files scanned."""
    samples: int = 0
    """Samples found in the scanned shards."""
    bytes: int = 0
    """Shard bytes read and hashed."""
    source_files: int = 0
    """Source files hashed (source mode)."""
    seconds: float = 0.0
    """Wall time of the whole verification."""
    scan_seconds: float = 0.0
    """Wall time from submitting the first shard task to the last result (no cluster start-up)."""
    workers: int = 1

    @property
    def ok(self) -> bool:
        """True when no problem was found."""
        return not self.problems

    def summary(self) -> list[str]:
        """The summary lines printed after the problems."""
        mb = self.bytes / 1e6
        rate = f", {mb / self.scan_seconds:.1f} MB/s" if self.scan_seconds > 0 and self.bytes else ""
        head = (
            f"verify {self.mode}: {self.out}: {self.shards} shards, {self.samples} samples, {mb:.1f} MB"
            + (f", {self.source_files} source files" if self.source_files else "")
            + f" in {self.seconds:.1f} s ({self.workers} worker{'s' if self.workers > 1 else ''}{rate})"
        )
        if self.ok:
            return [head, "OK: no problems found"]
        by = collections.Counter(p.check for p in self.problems)
        detail = ", ".join(f"{c} {n}" for c, n in sorted(by.items()))
        return [head, f"FAILED: {len(self.problems)} problem{'s' if len(self.problems) > 1 else ''} ({detail})"]

    def lines(self) -> list[str]:
        """One line per problem, then the summary."""
        return [p.line() for p in self.problems] + self.summary()

    def to_json(self) -> dict[str, Any]:
        """The machine-readable report (what ``--json`` writes)."""
        return {
            "out": str(self.out),
            "mode": self.mode,
            "ok": self.ok,
            "problems": [dataclasses.asdict(p) for p in self.problems],
            "problems_by_check": dict(sorted(collections.Counter(p.check for p in self.problems).items())),
            "shards": self.shards,
            "samples": self.samples,
            "bytes": self.bytes,
            "source_files": self.source_files,
            "seconds": round(self.seconds, 3),
            "scan_seconds": round(self.scan_seconds, 3),
            "workers": self.workers,
        }


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
    if cfg.source is not None and not cfg.source.is_dir():
        raise VerifyUsageError(f"--source {cfg.source} is not a folder")
    patient_labels = _load_label_csv(cfg.labels) if cfg.labels is not None else None
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
    size = _check_manifest(manifest, problems)
    if not all(_usable(s) for s in manifest.shards):
        return _done(report, t0)  # a shard list with wrong field types (reported) cannot guide the scan

    present = _check_shard_files(out, manifest, problems)
    calls = _shard_calls(manifest, present, size, cfg, problems)
    inputs: list[tuple[str, int]] = []
    if cfg.source is not None:
        from ingest.plan import discover

        inputs = discover(cfg.source)[0]
        for i in range(0, len(inputs), SOURCE_BATCH):
            batch = inputs[i : i + SOURCE_BATCH]
            calls.append(_Call(hash_files, dict(root=str(cfg.source), rels=[r for r, _ in batch]),
                               sum(s for _, s in batch), f"source-{i}"))

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
        problems.extend(_shard_vs_manifest(scan, info))
        problems.extend(scan.problems)
    scans_in_order = [scans[s.name] for s in manifest.shards if s.name in scans]
    report.shards = len(scans_in_order)
    report.samples = sum(len(s.keys) for s in scans_in_order)
    report.bytes = sum(s.bytes for s in scans_in_order)
    report.source_files = len(source_sha)
    problems.extend(_cross_shard(manifest, scans))
    rejects = _read_rejects(out, manifest, problems)
    if cfg.deep:
        problems.extend(_check_labels_zarr(out, manifest, scans))
    if cfg.source is not None:
        problems.extend(_check_source(cfg.source, inputs, manifest, scans_in_order, rejects, source_sha))
    if patient_labels is not None:
        problems.extend(_check_patients(cfg.labels, patient_labels, manifest, scans_in_order, rejects))
    return _done(report, t0)


def _check_shard_files(out: Path, m: Manifest, problems: list[Problem]) -> dict[str, Path]:
    """Listed shards missing from ``shards/`` and files there the manifest does not list;
    returns the files present by name."""
    shard_dir = out / SHARDS_DIR
    present = {p.name: p for p in shard_dir.iterdir()} if shard_dir.is_dir() else {}
    listed = {s.name for s in m.shards}
    missing = [s for s in m.shards if s.name not in present]
    for info in missing:
        problems.append(Problem("shard_missing", "listed in the manifest but not in shards/", shard=info.name))
    for name in sorted(set(present) - listed):
        p = present[name]
        hint = ""
        if p.is_file():
            same = [s.name for s in missing if s.bytes == p.stat().st_size]
            hint = f" (same size as missing {', '.join(same)}: renamed?)" if same else ""
        problems.append(Problem("shard_unlisted", f"not listed in the manifest{hint}", shard=name))
    return present


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
        kwargs = dict(path=str(path), split=info.split, size=size, deep=cfg.deep, keep_records=keep)
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


def _check_manifest(m: Manifest, problems: list[Problem]) -> int | None:
    """Well-formedness of the parsed manifest; returns the image size if it is usable."""

    def bad(check: str, what: str, expected: str | None = None, shard: str | None = None) -> None:
        problems.append(Problem(check, what, expected, shard=shard, where=None if shard else "manifest"))

    size: int | None = None
    for field in ("size", "clahe_clip", "clahe_grid"):
        if field not in m.params:
            bad("manifest_field", f"params lack {field!r}")
    raw_size = m.params.get("size")
    if isinstance(raw_size, int) and not isinstance(raw_size, bool) and raw_size > 0:
        size = raw_size
    elif "size" in m.params:
        bad("manifest_field", f"params.size {raw_size!r}", "a positive integer")
    actual = params_hash(m.params)
    if actual != m.params_hash:
        bad("params_hash", f"params {json.dumps(m.params, sort_keys=True)} hash to {actual[:16]}..., not to "
            "params_hash: edited after the ingest?", f"{m.params_hash[:16]}...")

    seen: set[str] = set()
    per_split: dict[str, list[ShardInfo]] = collections.defaultdict(list)
    for info in m.shards:
        if not isinstance(info.name, str):
            bad("manifest_field", f"shard name {info.name!r}", "a file name")
            continue
        match = _SHARD_NAME.match(info.name)
        if info.name in seen:
            bad("manifest_field", "shard listed twice", shard=info.name)
        seen.add(info.name)
        if info.split not in SPLITS:
            bad("manifest_field", f"split {info.split!r}", f"one of {list(SPLITS)}", shard=info.name)
        if match is None or match.group(1) != info.split:
            bad("manifest_field", f"name does not follow <split>-NNNNNN.tar for split {info.split!r}", shard=info.name)
        else:
            per_split[info.split].append(info)
            if int(match.group(2)) != len(per_split[info.split]) - 1:
                bad("manifest_field", f"shard index {int(match.group(2))}",
                    f"{len(per_split[info.split]) - 1} (consecutive per split)", shard=info.name)
        for field in ("samples", "bytes"):
            v = getattr(info, field)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad("manifest_field", f"{field} {v!r}", "a non-negative integer", shard=info.name)
        if not isinstance(info.sha256, str) or not HEX64.match(info.sha256):
            bad("manifest_field", f"sha256 {info.sha256!r}", "64 lowercase hex digits", shard=info.name)
        if isinstance(info.samples, int) and (info.samples == 0) != (info.first_key is None or info.last_key is None):
            bad("manifest_field", f"{info.samples} samples with first/last key {info.first_key!r}/{info.last_key!r}",
                shard=info.name)

    if not all(_usable(s) for s in m.shards):
        return size  # sums over a malformed shard list would only echo the problems above
    counts = m.counts
    total = 0
    for split in SPLITS:
        shards = [s for s in m.shards if s.split == split]
        n = sum(s.samples for s in shards if isinstance(s.samples, int))
        total += n
        c = counts.get(split)
        if not isinstance(c, dict):
            bad("manifest_counts", f"counts lack {split!r}")
            continue
        if c.get("samples") != n:
            bad("manifest_counts", f"counts.{split}.samples is {c.get('samples')!r} but its shards hold {n}", str(n))
        if c.get("shards") != len(shards):
            bad("manifest_counts", f"counts.{split}.shards is {c.get('shards')!r} but {len(shards)} are listed",
                str(len(shards)))
    if counts.get("samples") != total:
        bad("manifest_counts", f"counts.samples is {counts.get('samples')!r} but the shards hold {total}", str(total))
    return size


def _usable(info: ShardInfo) -> bool:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool) and v >= 0

    return (isinstance(info.name, str) and info.split in SPLITS and is_int(info.samples) and is_int(info.bytes)
            and isinstance(info.sha256, str))


def _shard_vs_manifest(scan: ShardScan, info: ShardInfo) -> list[Problem]:
    out: list[Problem] = []
    name = info.name
    if scan.sha256 is None:
        return out
    if scan.bytes == info.bytes and scan.sha256 != info.sha256:
        out.append(Problem("shard_sha256", f"sha256 {scan.sha256[:16]}... differs from the manifest: the shard "
                           "changed after the ingest", f"{str(info.sha256)[:16]}...", shard=name))
    if not scan.complete:
        return out  # keys past the damage are unknown; counts would only repeat the problem
    if len(scan.keys) != info.samples:
        out.append(Problem("shard_count", f"{len(scan.keys)} samples", f"{info.samples}", shard=name))
    first = scan.keys[0] if scan.keys else None
    last = scan.keys[-1] if scan.keys else None
    if first != info.first_key:
        out.append(Problem("shard_count", f"first key {first!r}", repr(info.first_key), shard=name))
    if last != info.last_key:
        out.append(Problem("shard_count", f"last key {last!r}", repr(info.last_key), shard=name))
    return out


def _cross_shard(m: Manifest, scans: dict[str, ShardScan]) -> list[Problem]:
    """Keys unique across shards; per-split samples, positives and boxes against the counts."""
    out: list[Problem] = []
    first_seen: dict[str, str] = {}
    for info in m.shards:
        scan = scans.get(info.name)
        if scan is None:
            continue
        for key in dict.fromkeys(scan.keys):  # a repeat inside one shard is reported by the scan
            other = first_seen.setdefault(key, info.name)
            if other != info.name:
                out.append(Problem("duplicate_key", f"key also in {other}", "each key in one shard only",
                                   shard=info.name, key=key))
    for split in SPLITS:
        infos = m.shards_of(split)
        done = [scans.get(s.name) for s in infos]
        if not infos or not all(s is not None and s.complete for s in done):
            continue  # a missing or damaged shard is reported already
        c = m.counts.get(split) if isinstance(m.counts.get(split), dict) else {}
        # samples per split follow from the per-shard counts, checked against the manifest already
        actual = {"positives": sum(s.positives for s in done), "boxes": sum(s.boxes for s in done)}
        for field, n in actual.items():
            if field in c and c[field] != n:
                out.append(Problem("split_count", f"split {split}: the shards hold {n} {field}",
                                   f"{c[field]} (counts.{split}.{field})", where="manifest"))
    return out


def _read_rejects(out: Path, m: Manifest, problems: list[Problem]) -> list[dict[str, Any]]:
    path = out / REJECTS_NAME
    where = REJECTS_NAME
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        problems.append(Problem("rejects_unreadable", f"cannot read: {exc}", where=where))
        return []
    lines: list[dict[str, Any]] = []
    for n, line in enumerate(text.splitlines(), start=1):
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(Problem("rejects_unreadable", f"not JSON ({exc})", where=f"{where} line {n}"))
            continue
        kind = rec.get("kind") if isinstance(rec, dict) else None
        if kind not in ("file", "label") or not isinstance(rec.get("reason"), str) or (
            kind == "file" and not isinstance(rec.get("path"), str)
        ):
            problems.append(Problem("rejects_unreadable", f"malformed line {line[:80]!r}",
                                    "kind file (path, reason, detail) or label (reason, detail, ...)",
                                    where=f"{where} line {n}"))
            continue
        rec["_line"] = n
        lines.append(rec)
    n_file = sum(r["kind"] == "file" for r in lines)
    n_label = len(lines) - n_file
    for field, n in (("rejects", n_file), ("label_problems", n_label)):
        if field in m.counts and m.counts[field] != n:
            problems.append(Problem("rejects_counts", f"{n} {field.replace('_', ' ')} lines",
                                    f"{m.counts[field]} (manifest counts.{field})", where=where))
    return lines


def _check_labels_zarr(out: Path, m: Manifest, scans: dict[str, ShardScan]) -> list[Problem]:
    """Each sample against its labels.zarr row; rows missing, extra or out of order."""
    try:
        table = read_labels(out / LABELS_NAME)
    except (FormatError, OSError, ValueError) as exc:
        return [Problem("labels_unreadable", str(exc), where=LABELS_NAME)]
    out_p: list[Problem] = []
    n_rows = len(table)
    if n_rows != m.counts.get("samples"):
        out_p.append(Problem("labels_count", f"{n_rows} rows", f"{m.counts.get('samples')} (manifest counts.samples)",
                             where=LABELS_NAME))
    index: dict[str, int] = {}
    for r, k in enumerate(table.key):
        k = str(k)
        if k in index:
            out_p.append(Problem("labels_row_extra", f"key also in row {index[k]}", where=f"{LABELS_NAME} row {r}",
                                 key=k))
        else:
            index[k] = r
    used: set[int] = set()
    order_break: Problem | None = None
    rows_lost = False
    offset = 0
    for i, info in enumerate(m.shards):
        scan = scans.get(info.name)
        for j, meta in enumerate(scan.records if scan is not None else []):
            key = meta["key"]
            r = index.get(key)
            if r is None:
                out_p.append(Problem("labels_row_missing", "no labels.zarr row for this sample", shard=info.name,
                                     key=key))
                rows_lost = True
                continue
            used.add(r)
            if len(meta) > 1:  # an unparseable JSON is reported by the scan; nothing to compare
                out_p.extend(_row_vs_meta(table, r, meta, i, info.name))
            if r != offset + j and order_break is None:
                order_break = Problem("labels_order", f"sample {j} of this shard is labels.zarr row {r}",
                                      f"row {offset + j} (rows follow the manifest's shard order)",
                                      shard=info.name, key=key)
        offset += info.samples if isinstance(info.samples, int) else 0
    unscanned = {i for i, s in enumerate(m.shards) if s.name not in scans or not scans[s.name].complete}
    for r in sorted(set(range(n_rows)) - used):
        if int(table.shard[r]) in unscanned:
            continue  # its shard is missing or damaged: reported already
        rows_lost = True
        shard = m.shards[int(table.shard[r])].name if 0 <= int(table.shard[r]) < len(m.shards) else None
        out_p.append(Problem("labels_row_extra", f"row names shard index {int(table.shard[r])} but no shard holds "
                             "this key", where=f"{LABELS_NAME} row {r}", key=str(table.key[r]), shard=shard))
    if order_break is not None and not rows_lost and not unscanned:
        out_p.append(order_break)
    return out_p


def _row_vs_meta(table: LabelTable, r: int, meta: dict[str, Any], shard_index: int, shard: str) -> list[Problem]:
    cls = meta.get("class")
    want: dict[str, Any] = {
        "patient_id": meta.get("patient_id"),
        "split": meta.get("split"),
        "target": meta.get("target"),
        "class_id": CLASS_NAMES.index(cls) if cls in CLASS_NAMES else -1,
        "shard": shard_index,
        "view_position": meta.get("view_position") or "",
        "sex": meta.get("sex") or "",
        "age": -1 if meta.get("age") is None else meta.get("age"),
    }
    out: list[Problem] = []
    for field, expected in want.items():
        got = getattr(table, field)[r]
        got = str(got) if isinstance(expected, str) else int(got)
        if got != expected:
            out.append(Problem("labels_mismatch", f"labels.zarr row {r} has {field} {got!r}, the sample's JSON "
                               f"{expected!r}", repr(expected), shard=shard, key=meta["key"]))
    boxes = meta.get("boxes")
    try:
        json_boxes = np.asarray(boxes if boxes is not None else [], dtype=np.float32).reshape(-1, 4)
    except (TypeError, ValueError):
        return out  # a malformed JSON box list is a deep meta problem, reported by the scan
    if not np.array_equal(table.boxes_of(r), json_boxes):
        out.append(Problem("labels_mismatch", f"labels.zarr row {r} has boxes {fmt_boxes(table.boxes_of(r))}, "
                           "not the sample's JSON boxes", fmt_boxes(json_boxes), shard=shard, key=meta["key"]))
    return out


def _check_source(
    source: Path,
    inputs: list[tuple[str, int]],
    m: Manifest,
    scans: list[ShardScan],
    rejects: list[dict[str, Any]],
    sha: dict[str, str],
) -> list[Problem]:
    """Every input file is exactly one sample or one file reject; sample sha256s match."""
    from ingest.plan import source_fingerprint

    out: list[Problem] = []
    fingerprint = source_fingerprint(inputs)
    recorded = m.source.get("fingerprint")
    if recorded is not None and fingerprint != recorded:
        out.append(Problem("source_fingerprint", f"the {len(inputs)} input files under {source} (paths and sizes) "
                           f"hash to {fingerprint[:16]}..., not to the fingerprint of the {m.source.get('files')} "
                           "files ingested", f"{str(recorded)[:16]}...", where="source"))
    uses: dict[str, list[str]] = collections.defaultdict(list)
    for scan in scans:
        for meta in scan.records:
            src = meta.get("source") if isinstance(meta.get("source"), dict) else {}
            rel = src.get("path")
            if not isinstance(rel, str):
                continue  # deep mode reports a malformed source field
            uses[rel].append(f"sample {scan.name}:{meta['key']}")
            if rel not in sha:
                out.append(Problem("source_missing", f"its source file {rel} is not in {source}",
                                   shard=scan.name, key=meta["key"]))
            elif sha[rel].startswith("error:"):
                out.append(Problem("source_unreadable", f"source file {rel}: {sha[rel]}", shard=scan.name,
                                   key=meta["key"]))
            elif sha[rel] != src.get("sha256"):
                out.append(Problem("source_sha256", f"source file {rel} has sha256 {sha[rel][:16]}...: it changed "
                                   "after the ingest", f"{str(src.get('sha256'))[:16]}...",
                                   shard=scan.name, key=meta["key"]))
    for rec in rejects:
        if rec["kind"] != "file":
            continue
        rel = rec["path"]
        uses[rel].append(f"{REJECTS_NAME} line {rec['_line']}")
        if rel not in sha:
            out.append(Problem("source_missing", f"rejected file {rel} ({rec['reason']}) is not in {source}",
                               where=f"{REJECTS_NAME} line {rec['_line']}"))
    for rel, _size in inputs:
        n = len(uses.get(rel, ()))
        if n == 0:
            out.append(Problem("source_unaccounted", "neither a sample nor a rejects line (added after the ingest?)",
                               "one sample or one rejects line", where=f"source {rel}"))
        elif n > 1:
            out.append(Problem("source_twice", f"is {n} things: {', '.join(uses[rel])}",
                               "one sample or one rejects line", where=f"source {rel}"))
    return out


def _check_patients(
    path: Path | None,
    patient_labels: tuple[dict[str, Any], str],
    m: Manifest,
    scans: list[ShardScan],
    rejects: list[dict[str, Any]],
) -> list[Problem]:
    """Every labelled patient is a sample, a file reject, or a label_without_image problem."""
    from ingest.plan import patient_id_of

    labels, sha = patient_labels
    out: list[Problem] = []
    recorded = m.source.get("labels_sha256")
    if recorded is not None and recorded != sha:
        out.append(Problem("labels_file_changed", f"--labels {path} has sha256 {sha[:16]}...",
                           f"{str(recorded)[:16]}... (the labels file ingested)", where="labels"))
    sampled: set[str] = set()
    for scan in scans:
        for meta in scan.records:
            pid = meta.get("patient_id")
            if not isinstance(pid, str):
                continue
            sampled.add(pid)
            label = labels.get(pid)
            if label is None:
                out.append(Problem("label_mismatch", f"patient {pid} is not in the labels file", shard=scan.name,
                                   key=meta["key"]))
            elif meta.get("target") != label.target:
                out.append(Problem("label_mismatch", f"target {meta.get('target')!r}", f"{label.target} (labels file)",
                                   shard=scan.name, key=meta["key"]))
    rejected = {patient_id_of(r["path"]) for r in rejects if r["kind"] == "file"}
    without = {r.get("patient_id") for r in rejects if r["kind"] == "label" and r["reason"] == "label_without_image"}
    for pid in sorted(set(labels) - sampled - rejected - without):
        out.append(Problem("patient_unaccounted", "labelled patient is no sample, no file reject and no "
                           "label_without_image line", "one of those", where=f"labels patient {pid}"))
    return out
