"""The dataset-level checks of ``python -m shards verify``: what no single shard's scan can see.

The manifest against itself, each :class:`~shards.scan.ShardScan` against its manifest entry
(sha256, counts, first and last keys, per-sample digests), keys and counts across shards,
``rejects.jsonl``, ``labels.zarr`` row by row (deep), and the source folder and labels CSV
(source mode). Each returns or appends :class:`Problem` values; none raises for damaged data.
:func:`shards.verify.verify` runs them in that order.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np

from shards.format import MEMBER_EXTS, SHARD_NAME, SPLITS, FormatError
from shards.label_csv import PatientLabel
from shards.labels import LabelRow, LabelTable, read_labels
from shards.manifest import LABELS_NAME, REJECTS_NAME, SHARDS_DIR, Manifest, ShardInfo, params_hash
from shards import schema
from shards.report import Problem
from shards.scan import ShardScan, fmt_boxes
from shards.source import patient_id_of, source_fingerprint


def check_manifest(m: Manifest, problems: list[Problem]) -> int | None:
    """Well-formedness of the parsed manifest; returns the image size if it is usable."""

    def bad(check: str, what: str, expected: str | None = None, shard: str | None = None) -> None:
        problems.append(Problem(check, what, expected, shard=shard, where=None if shard else "manifest"))

    params_problems = schema.PARAMS.problems(m.params)
    for p in params_problems:
        bad("manifest_field", p.what, p.expected)
    size = None if any(p.field == "size" for p in params_problems) else m.params.get("size")
    actual = params_hash(m.params)
    if actual != m.params_hash:
        bad("params_hash", f"params {json.dumps(m.params, sort_keys=True)} hash to {actual[:16]}..., not to "
            "params_hash: edited after the ingest?", f"{m.params_hash[:16]}...")

    seen: set[str] = set()
    for info in m.shards:
        name = info.name if isinstance(info.name, str) else None
        for p in schema.SHARD.problems(_entry(info)):
            bad("manifest_field", p.what, p.expected, shard=name)
        if name is None:
            continue
        match = SHARD_NAME.match(info.name)
        if info.name in seen:
            bad("manifest_field", "shard listed twice", shard=info.name)
        seen.add(info.name)
        # Numbers need not follow on: a dataset's change adds shards with new numbers.
        if match is None or match.group(1) != info.split:
            bad("manifest_field", f"name does not follow <split>-NNNNNN.tar for split {info.split!r}", shard=info.name)
        if isinstance(info.samples, int) and (info.samples == 0) != (info.first_key is None or info.last_key is None):
            bad("manifest_field", f"{info.samples} samples with first/last key {info.first_key!r}/{info.last_key!r}",
                shard=info.name)

    if not all(usable(s) for s in m.shards):
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


def usable(info: ShardInfo) -> bool:
    """True when a manifest shard entry has the field types a scan and the sums need."""
    return schema.SHARD_TYPES.is_valid(_entry(info))


def _entry(info: ShardInfo) -> dict[str, Any]:
    """A shard entry as the manifest holds it, for :mod:`shards.schema`."""
    return {f.name: getattr(info, f.name) for f in dataclasses.fields(info)}


def shard_files(out: Path, m: Manifest, problems: list[Problem], kept: frozenset[str] = frozenset()) -> dict[str, Path]:
    """Listed shards missing from ``shards/`` and files there the manifest does not list
    (other than ``kept``: the shards of the dataset's other readable versions); returns the
    files present by name."""
    shard_dir = out / SHARDS_DIR
    present = {p.name: p for p in shard_dir.iterdir()} if shard_dir.is_dir() else {}
    listed = {s.name for s in m.shards} | kept
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


def shard_vs_manifest(scan: ShardScan, info: ShardInfo) -> list[Problem]:
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
    if len(scan.keys) == info.samples:  # otherwise samples and digests no longer pair up by position
        out.extend(sample_digests(scan, info))
    return out


def sample_digests(scan: ShardScan, info: ShardInfo) -> list[Problem]:
    """Each sample member's xxh3-128 (hashed by the scan) against the manifest's per-sample
    digests, which the loader checks every read against: one problem per member that differs.

    Samples pair with digests by position in the shard; a manifest without digests (format 1)
    or a scan that did not hash has nothing to compare.
    """
    if info.xxh3 is None or scan.xxh3 is None:
        return []
    out: list[Problem] = []
    for index, (key, actual, expected) in enumerate(zip(scan.keys, scan.xxh3, info.xxh3)):
        for ext, got, want in zip(MEMBER_EXTS, actual, expected):
            if got != want:
                out.append(Problem("sample_xxh3", f"sample {index} .{ext} hashes to xxh3 {got[:16]}..., not to the "
                                   "manifest's digest: the loader refuses this sample", f"{want[:16]}...",
                                   shard=info.name, key=key))
    return out


def cross_shard(m: Manifest, scans: dict[str, ShardScan]) -> list[Problem]:
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


def read_rejects(out: Path, m: Manifest, problems: list[Problem]) -> list[dict[str, Any]]:
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


def check_labels_zarr(out: Path, m: Manifest, scans: dict[str, ShardScan]) -> list[Problem]:
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
    row = LabelRow.from_meta(meta, shard_index)
    want = {f.name: getattr(row, f.name) for f in dataclasses.fields(LabelRow) if f.name not in ("key", "boxes")}
    out: list[Problem] = []
    for field, expected in want.items():
        if field == "qa" and expected is None:
            continue
        got = getattr(table, field)[r]
        got = str(got) if isinstance(expected, str) else int(got)
        if got != expected:
            out.append(Problem("labels_mismatch", f"labels.zarr row {r} has {field} {got!r}, the sample's JSON "
                               f"{expected!r}", repr(expected), shard=shard, key=meta["key"]))
    try:
        json_boxes = np.asarray(row.boxes, dtype=np.float32).reshape(-1, 4)
    except (TypeError, ValueError):
        return out  # a malformed JSON box list is a deep meta problem, reported by the scan
    if not np.array_equal(table.boxes_of(r), json_boxes):
        out.append(Problem("labels_mismatch", f"labels.zarr row {r} has boxes {fmt_boxes(table.boxes_of(r))}, "
                           "not the sample's JSON boxes", fmt_boxes(json_boxes), shard=shard, key=meta["key"]))
    return out


def check_source(
    source: Path,
    inputs: list[tuple[str, int]],
    m: Manifest,
    scans: list[ShardScan],
    rejects: list[dict[str, Any]],
    sha: dict[str, str],
) -> list[Problem]:
    """Every input file is exactly one sample or one file reject; sample sha256s match."""
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


def check_patients(
    path: Path | None,
    patient_labels: tuple[dict[str, PatientLabel], str],
    m: Manifest,
    scans: list[ShardScan],
    rejects: list[dict[str, Any]],
) -> list[Problem]:
    """Every labelled patient is a sample, a file reject, or a label_without_image problem."""
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
    # A file's patient is the id the ingest went by: its patient_id_mismatch line names it
    # where the name does not (--patient-id tag on renamed files).
    went_by = {r.get("path"): r.get("patient_id") for r in rejects if r["kind"] == "label" and r["reason"] == "patient_id_mismatch"}
    rejected = {went_by.get(r["path"]) or patient_id_of(r["path"]) for r in rejects if r["kind"] == "file"}
    without = {r.get("patient_id") for r in rejects if r["kind"] == "label" and r["reason"] == "label_without_image"}
    for pid in sorted(set(labels) - sampled - rejected - without):
        out.append(Problem("patient_unaccounted", "labelled patient is no sample, no file reject and no "
                           "label_without_image line", "one of those", where=f"labels patient {pid}"))
    return out
