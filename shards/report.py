"""What ``python -m shards verify`` reports: the table of checks, one :class:`Problem` per thing
found wrong, and the :class:`VerifyReport` printed (one line per problem, then a summary) and
written as JSON.
"""

from __future__ import annotations

import collections
import dataclasses
from pathlib import Path
from typing import Any

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
    "sample_xxh3": "a sample member's xxh3-128 differs from the manifest's per-sample digest",
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


@dataclasses.dataclass(frozen=True)
class Problem:
    """One thing found wrong; printed as one line and written to the JSON report."""

    check: str
    """A key of :data:`CHECKS`."""
    what: str
    """What is wrong, in words."""
    expected: str | None = None
    """What was expected instead, when there is a single expected value."""
    shard: str | None = None
    """The shard file it concerns."""
    key: str | None = None
    """The sample key it concerns."""
    where: str | None = None
    """Any other location: ``manifest``, ``labels.zarr row 7``, ``source a/b.dcm``."""

    def line(self) -> str:
        """``<shard> key <key> <where>: <what> (expected <expected>)``."""
        loc = " ".join(
            p for p in (self.shard, f"key {self.key}" if self.key else None, self.where) if p
        )
        text = f"{loc or 'dataset'}: {self.what}"
        return text + (f" (expected {self.expected})" if self.expected is not None else "")


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
    notes: list[str] = dataclasses.field(default_factory=list)
    """Checks left out and why (a pseudonymized dataset verified without its key)."""

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
        return [p.line() for p in self.problems] + [f"note: {n}" for n in self.notes] + self.summary()

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
            "notes": list(self.notes),
        }
