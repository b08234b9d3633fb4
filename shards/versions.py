"""Dataset versions: ``OUT/versions/vNNNN.json`` records and the ``OUT@vN`` form that names one.

A dataset changes by adding shards (an append) or by replacing the shards that hold withdrawn
patients (``python -m shards withdraw``); each change makes a new version. The folder::

    OUT/manifest.json              the latest version's manifest (readers that know no versions)
    OUT/labels.zarr, rejects.jsonl the latest version's labels and rejects
    OUT/shards/                    the shards of every kept version (numbers need not follow on)
    OUT/versions/v0001.json        one record per version: manifest, parent, time, change, counts
    OUT/versions/v0001.labels.zarr that version's label rows (the same arrays as labels.zarr)
    OUT/versions/v0001.rejects.jsonl

A dataset without ``versions/`` is version 1 of itself; the first change writes its record
(``v0001``) before its own (``v0002``). Records never change, with one exception: a withdrawal
erases the withdrawn patients from every record, and marks each version that held one
:attr:`VersionRecord.unavailable` (its shards are deleted, so it can no longer be read or
checked). ``python -m shards gc`` marks the versions it drops the same way.

``OUT@vN`` (a trailing ``@v`` and digits) names version N of the dataset at OUT, a path or
a URL; ``user:password@host`` in a URL never ends that way, so the two stay apart.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import re
import shutil
from pathlib import Path
from typing import Any

from shards.atomic import atomic_dir, atomic_path, atomic_write_text
from shards.format import SHARD_NAME, FormatError
from shards.jsontext import Raw, indented
from shards.labels import LabelTable, write_labels
from shards.manifest import (
    LABELS_NAME,
    MANIFEST_NAME,
    REJECTS_NAME,
    SHARDS_DIR,
    Manifest,
    ShardInfo,
    text_sha256,
    write_manifest,
)

VERSIONS_DIR = "versions"
_AT_VERSION = re.compile(r"^(.+)@v(\d+)$")


class VersionError(ValueError):
    """A version that cannot be read: there is no such version, or it is no longer kept."""


class VersionNotFoundError(VersionError):
    """``OUT@vN`` names a version the dataset never had."""


class VersionUnavailableError(VersionError):
    """``OUT@vN`` names a version whose shards were deleted (a withdrawal, or ``gc``)."""


def split_version(location: str | Path) -> tuple[str | Path, int | None]:
    """``(location, N)`` for ``location@vN``; ``(location, None)`` without a version.

    >>> split_version("s3://bkt/ds@v3")
    ('s3://bkt/ds', 3)
    >>> split_version("https://alice:pw@host/ds")
    ('https://alice:pw@host/ds', None)
    """
    m = _AT_VERSION.match(str(location))
    if m is None:
        return location, None
    number = int(m.group(2))
    if number < 1:
        raise VersionNotFoundError(f"{m.group(1)}@v{m.group(2)}: versions are numbered from 1")
    base: str | Path = Path(m.group(1)) if isinstance(location, Path) else m.group(1)
    return base, number


def with_version(display: str, version: int | None) -> str:
    """``display@vN`` (or ``display`` when ``version`` is None), for messages."""
    return display if version is None else f"{display}@v{version}"


def record_rel(version: int) -> str:
    """The record of ``version``, relative to the dataset root."""
    return f"{VERSIONS_DIR}/v{version:04d}.json"


def labels_rel(version: int) -> str:
    """The label store of ``version``, relative to the dataset root."""
    return f"{VERSIONS_DIR}/v{version:04d}.labels.zarr"


def rejects_rel(version: int) -> str:
    """The rejects of ``version``, relative to the dataset root."""
    return f"{VERSIONS_DIR}/v{version:04d}.rejects.jsonl"


def utc_now() -> str:
    """The time a record is written: ISO 8601 in UTC, to the second."""
    return datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0).isoformat()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Change:
    """What made a version from its parent. Counts only: a withdrawal names no patient."""

    kind: str
    """``ingest`` (version 1), ``append`` or ``withdraw``."""
    patients: int = 0
    """Patients added or withdrawn."""
    samples: int = 0
    """Samples added or withdrawn."""
    shards_added: tuple[str, ...] = ()
    """Shard files this version added."""
    shards_removed: tuple[str, ...] = ()
    """Shard files of the parent that this version no longer lists."""

    def describe(self) -> str:
        """One line for ``python -m shards versions``."""
        if self.kind == "ingest":
            return "first ingest"
        verb = {"append": "added", "withdraw": "withdrew"}.get(self.kind, self.kind)
        shards = f"{len(self.shards_added)} shards written"
        if self.shards_removed:
            shards += f", {len(self.shards_removed)} replaced"
        return f"{self.kind}: {verb} {self.patients} patients, {self.samples} samples ({shards})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Unavailable:
    """Why a version can no longer be read or checked."""

    date: str
    """When it stopped being readable (ISO 8601, UTC)."""
    reason: str
    """One line, such as ``version 3 withdrew patients from its shards``."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class VersionRecord:
    """``versions/vNNNN.json``: one version of a dataset."""

    version: int
    parent: int | None
    """The version this one was made from (None for the first)."""
    created: str
    """When it was made (ISO 8601, UTC)."""
    change: Change
    manifest: Manifest
    """The version's manifest (its ``counts`` are the version's counts)."""
    manifest_sha256: str
    """SHA-256 of the manifest's canonical text (:func:`shards.manifest.manifest_sha256`)."""
    unavailable: Unavailable | None = None

    @property
    def samples(self) -> int:
        return int(self.manifest.counts.get("samples", 0))

    def shard_names(self) -> set[str]:
        return {s.name for s in self.manifest.shards}

    def to_json(self, manifest_text: str | None = None) -> str:
        """The record's text; ``manifest_text`` is :attr:`manifest`'s (``Manifest.to_json``)
        when the caller has it already."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["change"] = dataclasses.asdict(self.change)
        data["unavailable"] = None if self.unavailable is None else dataclasses.asdict(self.unavailable)
        data["manifest"] = Raw(self.manifest.to_json() if manifest_text is None else manifest_text)
        return indented(data) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VersionRecord":
        """Build from parsed JSON, raising :class:`FormatError` on a malformed record."""
        try:
            change = dict(data["change"])
            change["shards_added"] = tuple(change.get("shards_added", ()))
            change["shards_removed"] = tuple(change.get("shards_removed", ()))
            gone = data.get("unavailable")
            return cls(
                version=int(data["version"]),
                parent=None if data["parent"] is None else int(data["parent"]),
                created=str(data["created"]),
                change=Change(**change),
                manifest=Manifest.from_dict(data["manifest"]),
                manifest_sha256=str(data["manifest_sha256"]),
                unavailable=None if gone is None else Unavailable(**gone),
            )
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, FormatError):
                raise
            raise FormatError(f"malformed version record: {exc!r}") from exc


def first_record(manifest: Manifest, created: str, manifest_text: str | None = None) -> VersionRecord:
    """The record of a dataset made before versions existed: version 1 of itself
    (``manifest_text``: the manifest's text, when the caller has it already)."""
    names = tuple(s.name for s in manifest.shards)
    change = Change(kind="ingest", samples=int(manifest.counts.get("samples", 0)), shards_added=names)
    text = manifest.to_json() if manifest_text is None else manifest_text
    return VersionRecord(version=manifest.version, parent=None, created=created, change=change,
                         manifest=manifest, manifest_sha256=text_sha256(text))


# --------------------------------------------------------------------------- local folders


def read_record(root: Path, version: int) -> VersionRecord:
    """``root``'s record of ``version`` (FileNotFoundError when it has none)."""
    path = root / record_rel(version)
    try:
        return VersionRecord.from_dict(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc


def write_record(root: Path, record: VersionRecord, manifest_text: str | None = None) -> Path:
    """Write (or, for a withdrawal's erasure, rewrite) a record atomically (``manifest_text``:
    its manifest's text, when the caller has it already)."""
    path = root / record_rel(record.version)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, record.to_json(manifest_text))
    return path


def list_records(root: Path, latest: Manifest) -> list[VersionRecord]:
    """Every version of the dataset at ``root`` in order, the latest last; a version whose
    record is missing (only the latest of a dataset made before versions existed) is made
    from ``latest``."""
    records = []
    for n in range(1, latest.version):
        records.append(read_record(root, n))
    path = root / record_rel(latest.version)
    if path.is_file():
        records.append(read_record(root, latest.version))
    else:
        records.append(first_record(latest, _written(root / MANIFEST_NAME)))
    return records


def _written(path: Path) -> str:
    """When ``path`` was last written, as :func:`utc_now` gives a time."""
    when = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.timezone.utc)
    return when.replace(microsecond=0).isoformat()


def kept_shards(records: list[VersionRecord]) -> dict[str, ShardInfo]:
    """The shards that some readable version lists, by name."""
    kept: dict[str, ShardInfo] = {}
    for r in records:
        if r.unavailable is None:
            kept.update({s.name: s for s in r.manifest.shards})
    return kept


def save_current(root: Path, latest: Manifest) -> VersionRecord:
    """The latest version's record, written first (with copies of its label store and
    rejects) when the dataset has none: a dataset made before versions existed becomes
    version 1 of itself before a change makes version 2. No other record is read."""
    if (root / record_rel(latest.version)).is_file():
        return read_record(root, latest.version)
    text = latest.to_json()
    record = first_record(latest, _written(root / MANIFEST_NAME), text)
    (root / VERSIONS_DIR).mkdir(exist_ok=True)
    with atomic_dir(root / labels_rel(record.version)) as tmp:
        shutil.copytree(root / LABELS_NAME, tmp)
    with atomic_path(root / rejects_rel(record.version)) as tmp:
        shutil.copyfile(root / REJECTS_NAME, tmp)
    write_record(root, record, text)
    return record


def commit_version(root: Path, parent: VersionRecord, manifest: Manifest, labels: LabelTable, rejects: list[str],
                   change: Change) -> VersionRecord:
    """Write a new version made from ``parent``: its label store, rejects and record under
    ``versions/``, then the same as the dataset's ``labels.zarr``, ``rejects.jsonl`` and,
    last, ``manifest.json`` (its shards must already be in ``shards/``).

    Args:
        manifest: The new version's manifest (its ``version`` is set here; its format
            version stays the parent's).
        labels: Its label rows.
        rejects: Its ``rejects.jsonl`` lines, each ending in a newline.
    """
    # The format stays the parent's: a change copies samples as they are, and the format names
    # the fields they hold; the version number is read from a manifest of any format.
    manifest = dataclasses.replace(manifest, version=parent.version + 1)
    text = manifest.to_json()
    record = VersionRecord(version=manifest.version, parent=parent.version, created=utc_now(), change=change,
                           manifest=manifest, manifest_sha256=text_sha256(text))
    lines = "".join(rejects)
    write_labels(root / labels_rel(record.version), labels)
    atomic_write_text(root / rejects_rel(record.version), lines)
    write_record(root, record, text)
    with atomic_dir(root / LABELS_NAME) as tmp:  # the same bytes: copied, not encoded again
        shutil.copytree(root / labels_rel(record.version), tmp)
    atomic_write_text(root / REJECTS_NAME, lines)
    write_manifest(root, manifest, text)
    return record


@dataclasses.dataclass(frozen=True)
class GcPlan:
    """What ``python -m shards gc OUT --keep N`` deletes (or would delete)."""

    kept: tuple[int, ...]
    """The readable versions kept."""
    dropped: tuple[int, ...]
    """The readable versions that become unavailable."""
    shards: tuple[tuple[str, int], ...]
    """``(file name, bytes)`` of each shard file that no kept version lists."""

    @property
    def bytes(self) -> int:
        return sum(size for _, size in self.shards)


def plan_gc(root: Path, latest: Manifest, keep: int) -> GcPlan:
    """Keep the ``keep`` latest readable versions; every shard file that none of them lists goes."""
    if keep < 1:
        raise ValueError(f"--keep {keep}: keep at least 1 version (the latest)")
    readable = [r for r in list_records(root, latest) if r.unavailable is None]
    kept, dropped = readable[-keep:], readable[:-keep]
    listed = kept_shards(kept)
    files = sorted(p for p in (root / SHARDS_DIR).iterdir() if SHARD_NAME.match(p.name) and p.name not in listed)
    return GcPlan(tuple(r.version for r in kept), tuple(r.version for r in dropped),
                  tuple((p.name, p.stat().st_size) for p in files))


def apply_gc(root: Path, plan: GcPlan, keep: int) -> None:
    """Mark the dropped versions unavailable (their label stores and rejects go), then delete
    the shards of :attr:`GcPlan.shards`."""
    for n in plan.dropped:
        record = read_record(root, n)
        write_record(root, dataclasses.replace(record, unavailable=Unavailable(
            date=utc_now(), reason=f"python -m shards gc --keep {keep} dropped it")))
        shutil.rmtree(root / labels_rel(n), ignore_errors=True)
        (root / rejects_rel(n)).unlink(missing_ok=True)
    for name, _size in plan.shards:
        (root / SHARDS_DIR / name).unlink(missing_ok=True)


@dataclasses.dataclass(frozen=True)
class RecordedShards:
    """The shard names the version records under a dataset's ``versions/`` list."""

    kept: frozenset[str]
    """Listed by a readable record: files no clean-up may delete."""
    every: frozenset[str]
    """Listed by any record, unavailable ones too: names never used for other bytes."""


def read_recorded_shards(root: Path) -> RecordedShards:
    """The shard names of every record under ``root/versions/`` (none for a dataset without
    versions), taken from each record's JSON alone (no record is checked as :func:`read_record`
    checks it): each record holds a whole manifest, and an append reads them all once."""
    kept: set[str] = set()
    every: set[str] = set()
    for path in sorted((root / VERSIONS_DIR).glob("v[0-9][0-9][0-9][0-9].json")):
        try:
            data = json.loads(path.read_text())
            names = {str(s["name"]) for s in data["manifest"]["shards"]}
            if data.get("unavailable") is None:
                kept |= names
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise FormatError(f"{path}: malformed version record ({exc!r})") from exc
        every |= names
    return RecordedShards(frozenset(kept), frozenset(every))


def recorded_shards(root: Path) -> set[str]:
    """The shards that the readable version records under ``root/versions/`` list (none for a
    dataset without versions): files no clean-up may delete."""
    return set(read_recorded_shards(root).kept)
