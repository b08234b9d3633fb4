"""``python -m shards withdraw``: erase patients from a dataset, in a new version.

Erasure (GDPR's right to erasure) means that no byte under the dataset folder holds a withdrawn
patient afterwards:

* each shard of the latest version that holds one of them is written again without them,
  under a new shard number, and the new version lists it where the old one stood (so the
  label rows keep their order); shards without them are untouched, byte for byte;
* the new version's label rows and ``rejects.jsonl`` lose that patient's rows and lines (a
  rejects line goes when it holds the patient's id, key or pseudonym anywhere);
* every earlier version that listed a rewritten shard can no longer be read: its record is
  marked unavailable, its keys of those shards blanked, its label store and rejects deleted;
  the rejects of the other earlier versions lose those lines too (their counts follow);
* the old shard files are deleted, last. A withdrawal stopped before this point (after it
  wrote its version) is finished by the next ``withdraw`` of the dataset, with the same
  patients file; shards it wrote before its version existed are left for ``gc``.

The record of the new version logs the date and how many patients and samples went, never
an id (not even hashed). Copies outside the folder are out of reach: a node's shard cache
drops them the next time a reader opens the dataset (:func:`shards.origin.open_origin`).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import re
import shutil
from pathlib import Path

import numpy as np

from shards.atomic import atomic_write_text
from shards.format import SHARD_NAME, SPLITS, key_for, shard_name
from shards.labels import LabelTable, read_labels
from shards.manifest import LABELS_NAME, REJECTS_NAME, SHARDS_DIR, Manifest, ShardInfo, manifest_sha256, read_manifest
from shards.pseudonym import Pseudonymizer
from shards.reader import iter_samples
from shards.source_index import erase_keys
from shards.versions import (
    Change,
    Unavailable,
    VersionRecord,
    commit_version,
    labels_rel,
    list_records,
    rejects_rel,
    save_current,
    utc_now,
    write_record,
)
from shards.writer import ShardWriter

log = logging.getLogger(__name__)


class WithdrawError(ValueError):
    """A withdrawal that cannot start: an unreadable patients file, a missing or wrong key."""


@dataclasses.dataclass(frozen=True)
class WithdrawResult:
    """What a withdrawal did (counts only)."""

    version: int | None
    """The new version (None: no listed patient was in the dataset, nothing changed)."""
    patients: int
    """Listed patients found in the dataset (as samples or rejects lines)."""
    samples: int
    """Samples removed."""
    shards_rewritten: int
    """Shards written again without the patients (an emptied shard is dropped instead)."""
    versions_unavailable: tuple[int, ...]
    """Earlier versions that can no longer be read."""
    completed: int | None = None
    """An interrupted withdrawal's version whose erasure this call finished (None: none was
    interrupted)."""


def read_patient_file(path: Path) -> list[str]:
    """Patient ids, one a line (blank lines and ``#`` comments skipped)."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise WithdrawError(f"--patients {path}: cannot read ({exc})") from exc
    ids = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    if not ids:
        raise WithdrawError(f"--patients {path}: no patient id in it (one a line)")
    return ids


def _targets(manifest: Manifest, ids: list[str], key: Path | None) -> dict[str, set[str]]:
    """Per listed id, the strings that name it in the dataset: the id, its key and, for a
    pseudonymized dataset, its pseudonym (which is also its key)."""
    recorded = manifest.source.get("pseudonym")
    if recorded is not None and key is None:
        raise WithdrawError("the dataset is pseudonymized: withdraw needs the --pseudonymize KEYFILE it was made with")
    pseudonyms = Pseudonymizer.from_file(key) if key is not None else None
    if pseudonyms is not None and recorded is None:
        raise WithdrawError("--pseudonymize: the dataset is not pseudonymized")
    if pseudonyms is not None and pseudonyms.fingerprint != recorded.get("key_fingerprint"):
        raise WithdrawError("--pseudonymize: not the key the dataset was made with (its fingerprint differs)")
    out = {}
    for pid in ids:
        names = {pid, key_for(pid)}
        if pseudonyms is not None:
            names.add(pseudonyms.patient(pid))
        out[pid] = names
    return out


def _mentions(line: str, targets: dict[str, set[str]]) -> set[str]:
    """The listed ids a rejects line names (as a whole word: an id inside a longer one is not it)."""
    found = set()
    for pid, names in targets.items():
        if any(re.search(rf"(?<![A-Za-z0-9]){re.escape(n)}(?![A-Za-z0-9])", line) for n in names):
            found.add(pid)
    return found


def _filter_rejects(lines: list[str], targets: dict[str, set[str]]) -> tuple[list[str], set[str], int]:
    """(lines kept, ids met, file lines removed)."""
    kept, met, files = [], set(), 0
    for line in lines:
        who = _mentions(line, targets)
        if who:
            met |= who
            files += json.loads(line).get("kind") == "file"
        else:
            kept.append(line)
    return kept, met, files


def _read_lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True) if path.exists() else []


def _reject_counts(lines: list[str]) -> dict[str, object]:
    """The manifest's reject counts of a version's rejects lines."""
    entries = [json.loads(line) for line in lines]
    files = collections.Counter(e["reason"] for e in entries if e.get("kind") != "label")
    labels = collections.Counter(e["reason"] for e in entries if e.get("kind") == "label")
    return dict(rejects=sum(files.values()), rejects_by_reason=dict(sorted(files.items())),
                label_problems=sum(labels.values()), label_problems_by_reason=dict(sorted(labels.items())))


def _counts(old: dict, shards: list[ShardInfo], table: LabelTable, lines: list[str], files_gone: int) -> dict:
    counts = dict(old)
    for split in SPLITS:
        rows = table.split == split
        boxes = (table.box_offsets[1:] - table.box_offsets[:-1])[rows]
        counts[split] = dict(old.get(split, {}), samples=int(rows.sum()), positives=int((table.target[rows] == 1).sum()),
                             boxes=int(boxes.sum()), shards=sum(s.split == split for s in shards))
    counts.update(samples=len(table), positives=int((table.target == 1).sum()), boxes=int(len(table.boxes)))
    if "inputs" in counts:
        counts["inputs"] = int(counts["inputs"]) - (int(old.get("samples", 0)) - len(table)) - files_gone
    counts.update(_reject_counts(lines))
    return counts


def _next_numbers(out: Path, records: list[VersionRecord]) -> dict[str, int]:
    """Per split, the first shard number that no file and no version has used."""
    names = {p.name for p in (out / SHARDS_DIR).iterdir()} | {s.name for r in records for s in r.manifest.shards}
    top = {split: -1 for split in SPLITS}
    for name in names:
        if m := SHARD_NAME.match(name):
            top[m.group(1)] = max(top[m.group(1)], int(m.group(2)))
    return {split: n + 1 for split, n in top.items()}


def _rewrite(out: Path, info: ShardInfo, drop: set[str], name: str, size: int) -> ShardInfo | None:
    """``info``'s shard without the keys in ``drop``, as shard ``name`` (None when nothing is left)."""
    path = out / SHARDS_DIR / name
    writer = ShardWriter(path)
    with writer:
        for sample in iter_samples(out / SHARDS_DIR / info.name, expected_sha256=info.sha256, size=size):
            if sample.key not in drop:
                writer.write(sample.key, sample.image, sample.meta)
    w = writer.result
    assert w is not None
    if w.samples == 0:
        path.unlink()
        return None
    return ShardInfo(name=name, split=info.split, samples=w.samples, bytes=w.bytes, sha256=w.sha256,
                     first_key=w.first_key, last_key=w.last_key, xxh3=w.xxh3)


def withdraw(out: Path, ids: list[str], *, key: Path | None = None) -> WithdrawResult:
    """Erase the patients ``ids`` from the dataset folder ``out`` (see the module docstring).

    Raises:
        WithdrawError: A pseudonymized dataset without its key, or with another key.
        FileNotFoundError, FormatError: ``out`` is not a finished dataset.
    """
    latest = read_manifest(out)
    targets = _targets(latest, ids, key)
    completed = _finish_interrupted(out, latest, targets)
    table = read_labels(out / LABELS_NAME)
    lines = _read_lines(out / REJECTS_NAME)
    hit = np.zeros(len(table), dtype=bool)
    met: set[str] = set()
    for pid, names in targets.items():
        rows = np.isin(table.patient_id.astype(str), list(names)) | np.isin(table.key.astype(str), list(names))
        if rows.any():
            met.add(pid)
        hit |= rows
    kept_lines, met_in_rejects, files_gone = _filter_rejects(lines, targets)
    met |= met_in_rejects
    if not met:
        return WithdrawResult(None, 0, 0, 0, (), completed)

    parent = save_current(out, latest)
    records = list_records(out, latest)
    numbers = _next_numbers(out, records)
    drop_keys = set(table.key[hit].astype(str))
    touched = sorted({int(i) for i in table.shard[hit]})
    shards: list[ShardInfo] = []
    index_of: dict[int, int] = {}
    added, removed = [], []
    for i, info in enumerate(latest.shards):
        if i in touched:
            new = _rewrite(out, info, drop_keys, shard_name(info.split, numbers[info.split]), latest.size)
            numbers[info.split] += 1
            removed.append(info.name)
            if new is None:
                continue
            added.append(new.name)
            info = new
        index_of[i] = len(shards)
        shards.append(info)
    new_table = table.take(np.flatnonzero(~hit))
    new_table.shard = np.array([index_of[int(i)] for i in new_table.shard], dtype=table.shard.dtype)
    manifest = dataclasses.replace(latest, shards=shards,
                                   counts=_counts(latest.counts, shards, new_table, kept_lines, files_gone))
    change = Change(kind="withdraw", patients=len(met), samples=int(hit.sum()), shards_added=tuple(added),
                    shards_removed=tuple(removed))
    record = commit_version(out, parent, manifest, new_table, kept_lines, change)
    unavailable = _erase_from_earlier(out, records, set(removed), targets, record.version)
    for name in removed:
        (out / SHARDS_DIR / name).unlink(missing_ok=True)
    log.info("version %d: withdrew %d patients, %d samples", record.version, len(met), int(hit.sum()))
    return WithdrawResult(record.version, len(met), int(hit.sum()), len(touched), tuple(unavailable), completed)


def _finish_interrupted(out: Path, latest: Manifest, targets: dict[str, set[str]]) -> int | None:
    """Finish a withdrawal stopped after it wrote its version (before every earlier version was
    erased and the replaced shards deleted); return that version, or None when there was none.
    Run again with the same patients, the erasure is complete."""
    if latest.version == 1:
        return None
    records = list_records(out, latest)
    record = records[-1]
    removed = set(record.change.shards_removed)
    if record.change.kind != "withdraw" or not removed:
        return None
    earlier = records[:-1]
    pending = any(r.unavailable is None and r.shard_names() & removed for r in earlier)
    if not pending and not any((out / SHARDS_DIR / name).exists() for name in removed):
        return None
    log.warning("version %d: finishing its withdrawal (it stopped before every earlier version was erased)",
                record.version)
    _erase_from_earlier(out, earlier, removed, targets, record.version)
    for name in removed:
        (out / SHARDS_DIR / name).unlink(missing_ok=True)
    return record.version


def _erase_from_earlier(out: Path, records: list[VersionRecord], removed: set[str], targets: dict[str, set[str]],
                        by: int) -> list[int]:
    """Erase the patients from the earlier versions' records, label stores, rejects and source
    indexes; return the versions that can no longer be read."""
    erase_keys(out, set().union(*targets.values()))
    gone = []
    for record in records:
        rejects_path = out / rejects_rel(record.version)
        lines = _read_lines(rejects_path)
        kept_lines, met, _files = _filter_rejects(lines, targets)
        if record.shard_names() & removed or (record.unavailable is not None and met):
            shards = [dataclasses.replace(s, first_key=None, last_key=None) if s.name in removed else s
                      for s in record.manifest.shards]
            manifest = dataclasses.replace(record.manifest, shards=shards)
            why = record.unavailable or Unavailable(
                date=utc_now(), reason=f"version {by} withdrew patients from its shards")
            record = dataclasses.replace(record, manifest=manifest, manifest_sha256=manifest_sha256(manifest),
                                         unavailable=why)
            shutil.rmtree(out / labels_rel(record.version), ignore_errors=True)
            rejects_path.unlink(missing_ok=True)
            write_record(out, record)
            gone.append(record.version)
        elif met:
            manifest = dataclasses.replace(record.manifest, counts={**record.manifest.counts,
                                                                     **_reject_counts(kept_lines)})
            atomic_write_text(rejects_path, "".join(kept_lines))
            write_record(out, dataclasses.replace(record, manifest=manifest, manifest_sha256=manifest_sha256(manifest)))
    return gone

