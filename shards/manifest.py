"""``manifest.json``: the identity of an ingested dataset, written last by the ingest."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from collections.abc import Mapping
from typing import Any

from shards.atomic import atomic_write_text
from shards.checksum import check_digests
from shards.format import FORMAT_VERSION, FORMAT_VERSIONS, FormatError
from shards.jsontext import indented

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
LABELS_NAME = "labels.zarr"
REJECTS_NAME = "rejects.jsonl"
WORK_DIR = ".ingest"
"""Scratch folder of an unfinished ingest (removed when ``manifest.json`` is written)."""
DEFAULT_MAX_PIXELS = 8192 * 8192
"""Largest Rows x Columns decoded (67 MP): above every real radiograph (large flat-panel
detectors are about 4300 x 4300, mammograms 4096 x 5625, film digitisers about 60 MP)."""
READ_CHUNK = 4 << 20
"""Bytes per read when a whole file is read and hashed (shards, source files)."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardInfo:
    """One shard as the manifest records it."""

    name: str
    """File name under ``shards/``."""
    split: str
    """``train`` or ``val``."""
    samples: int
    """Number of samples (key pairs) in the shard."""
    bytes: int
    """File size in bytes."""
    sha256: str
    """Hex SHA-256 of the whole file."""
    first_key: str | None
    """Key of the first sample, or None for an empty shard."""
    last_key: str | None
    """Key of the last sample, or None for an empty shard."""
    xxh3: tuple[tuple[str, str], ...] | None = None
    """Per sample in file order, the hex xxh3-128 of its ``.npy`` and ``.json`` data
    (:mod:`shards.checksum`; format 2 on). None for a shard of a format 1 dataset, which
    readers check against :attr:`sha256` alone."""


_SHARD_FIELDS = tuple(f.name for f in dataclasses.fields(ShardInfo))


@dataclasses.dataclass(kw_only=True)
class Manifest:
    """The parsed ``manifest.json``."""

    format_version: int
    params: dict[str, Any]
    params_hash: str
    packages: dict[str, str]
    source: dict[str, Any]
    counts: dict[str, Any]
    shards: list[ShardInfo]
    version: int = 1
    """The dataset version this manifest describes (``shards.versions``), read from a manifest of
    any format; absent (a dataset made before versions) it is version 1."""

    @property
    def size(self) -> int:
        """Side length of the square images."""
        return int(self.params["size"])

    def shards_of(self, split: str) -> list[ShardInfo]:
        """The shards of one split, in manifest order."""
        return [s for s in self.shards if s.split == split]

    def to_json(self) -> str:
        """Canonical JSON text (sorted keys, indented, trailing newline)."""
        return indented(self.to_dict()) + "\n"

    def to_dict(self) -> dict[str, Any]:
        """The manifest as JSON values (``dataclasses.asdict`` without its deep copy of every
        digest: the values are shared with this manifest, not to be changed)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["shards"] = [{f: getattr(s, f) for f in _SHARD_FIELDS} for s in self.shards]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Manifest":
        """Build from parsed JSON, raising :class:`FormatError` on a malformed manifest."""
        try:
            version = data["format_version"]
            if version not in FORMAT_VERSIONS:
                raise FormatError(
                    f"format_version {version!r}: this reader reads versions 1 to {FORMAT_VERSION}"
                    + (" (the dataset was written by a newer pneumo-hpc: upgrade)"
                       if isinstance(version, int) and version > FORMAT_VERSION else "")
                )
            shards = [_shard_info(s) for s in data["shards"]]
            number = data.get("version", 1)
            if not isinstance(number, int) or isinstance(number, bool) or number < 1:
                raise FormatError(f"manifest version {number!r}: want a whole number >= 1")
            return cls(
                format_version=data["format_version"],
                params=dict(data["params"]),
                params_hash=str(data["params_hash"]),
                packages=dict(data["packages"]),
                source=dict(data["source"]),
                counts=dict(data["counts"]),
                shards=shards,
                version=number,
            )
        except (KeyError, TypeError) as exc:
            raise FormatError(f"malformed manifest: {exc!r}") from exc


def _shard_info(record: dict[str, Any]) -> ShardInfo:
    """A manifest's shard record as a :class:`ShardInfo` (lists made tuples, digests checked)."""
    xxh3 = record.get("xxh3")
    if xxh3 is not None:
        # A count of another type is one of the field problems verify reports (shards.schema).
        if isinstance(record.get("samples"), int):
            try:
                check_digests(record["name"], record["samples"], xxh3)
            except ValueError as exc:
                raise FormatError(f"malformed manifest: {exc}") from None
        xxh3 = tuple(tuple(pair) for pair in xxh3)
    return ShardInfo(**{**record, "xxh3": xxh3})


@dataclasses.dataclass(frozen=True, kw_only=True)
class ProcessingParams:
    """The parameters that decide a sample's pixels: part of the manifest's ``params``."""

    size: int
    """Side of the square output images."""
    clahe_clip: float
    """CLAHE clip limit (OpenCV ``clipLimit``)."""
    clahe_grid: int
    """CLAHE tile grid (``grid`` x ``grid`` tiles)."""
    resample: str = "area"
    """``dct`` or ``area``; ``area`` for datasets recorded before the parameter existed."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more Rows x Columns are rejected (``too_large``) before decoding."""
    sop_classes: str | None = None
    """Which SOP classes are ingested (``--sop-classes``); None, for datasets recorded before
    the parameter existed, judges none."""

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> "ProcessingParams":
        """The processing parameters among a manifest's ``params`` (others are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in params.items() if k in names})

    def to_params(self) -> dict[str, Any]:
        """The entries of the manifest's ``params`` these make."""
        return dataclasses.asdict(self)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunIdentity:
    """What makes two ingests the same dataset: their parameters and their inputs. An ingest
    into a folder that holds another identity's dataset, finished or not, is refused."""

    params: dict[str, Any]
    """The parameters that decide the output's bytes (the manifest's ``params``)."""
    params_hash: str
    source_fingerprint: str | None
    """:func:`shards.source.source_fingerprint` of the input files."""
    labels_sha256: str | None
    """SHA-256 of the labels file; None for an unlabelled set."""
    key_fingerprint: str | None = None
    """``--pseudonymize``: the key's fingerprint (:mod:`shards.pseudonym`); None without."""

    @classmethod
    def of(cls, params: dict[str, Any], source_fingerprint: str, labels_sha256: str | None,
           key_fingerprint: str | None = None) -> "RunIdentity":
        return cls(params=params, params_hash=params_hash(params), source_fingerprint=source_fingerprint,
                   labels_sha256=labels_sha256, key_fingerprint=key_fingerprint)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "RunIdentity":
        """From :meth:`to_json`'s form; raises KeyError or TypeError on another."""
        return cls(params=dict(data["params"] or {}), params_hash=str(data["params_hash"]),
                   source_fingerprint=data["source_fingerprint"], labels_sha256=data["labels_sha256"],
                   key_fingerprint=data.get("key_fingerprint"))

    @classmethod
    def from_manifest(cls, data: dict[str, Any]) -> "RunIdentity":
        """The identity a parsed ``manifest.json`` records, of any format version."""
        source = data.get("source") or {}
        return cls(params=dict(data.get("params") or {}), params_hash=str(data.get("params_hash")),
                   source_fingerprint=source.get("fingerprint"), labels_sha256=source.get("labels_sha256"),
                   key_fingerprint=(source.get("pseudonym") or {}).get("key_fingerprint"))

    def difference(self, other: "RunIdentity") -> str | None:
        """What makes ``other`` another dataset than this one, in words; None if nothing does
        (the key is compared apart: its message names the keys)."""
        if self.params_hash != other.params_hash:
            changes = ", ".join(f"{k} {v!r} -> {other.params.get(k)!r}"
                                for k, v in self.params.items() if other.params.get(k) != v)
            return f"made with other parameters ({changes})"
        if self.source_fingerprint != other.source_fingerprint:
            return "made from a different set of source files"
        if self.labels_sha256 != other.labels_sha256:
            return "made with a different labels file"
        return None


def read_manifest(root: Path | str) -> Manifest:
    """Read ``root/manifest.json``; raise FileNotFoundError or :class:`FormatError`."""
    path = Path(root) / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise FormatError(f"{path}: not valid JSON ({exc})") from exc
    return Manifest.from_dict(data)


def manifest_sha256(manifest: Manifest) -> str:
    """SHA-256 of the manifest's canonical text: of ``manifest.json``'s bytes as
    :func:`write_manifest` writes them, and of the manifest a version record holds."""
    return text_sha256(manifest.to_json())


def text_sha256(text: str) -> str:
    """:func:`manifest_sha256` from the manifest's text (``Manifest.to_json``), for a caller
    that has it already."""
    return hashlib.sha256(text.encode()).hexdigest()


def write_manifest(root: Path | str, manifest: Manifest, text: str | None = None) -> Path:
    """Write ``root/manifest.json`` atomically (temporary name, fsync, rename); ``text`` is the
    manifest's (``Manifest.to_json``) when the caller has it already."""
    path = Path(root) / MANIFEST_NAME
    atomic_write_text(path, manifest.to_json() if text is None else text)
    return path


def sync_files(paths: list[Path]) -> None:
    """fsync each file (already closed by whoever wrote it), then each folder holding them."""
    for path in [*paths, *{p.parent for p in paths}]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def params_hash(params: dict[str, Any]) -> str:
    """SHA-256 of the canonical JSON of ``params``: the manifest's ``params_hash``."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()


def sha256_file(path: Path | str) -> str:
    """Hex SHA-256 of a file (``hashlib.file_digest``: one reused buffer, the GIL released
    while it hashes)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()
