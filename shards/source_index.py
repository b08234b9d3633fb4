"""The source index a dataset keeps for appends: which source files it holds, and each sample's labels.

``OUT/sources.json`` (written by the first ingest) and ``OUT/versions/vNNNN.sources.json``
(written by each append before its record) map each sample's key (the one its shard carries:
the pseudonym under a key) to

* ``sha256``: that of the source file it was made from, so that an append skips the files
  already ingested without reading any shard;
* ``label``: a digest of the label it was made with (target, detailed class, boxes in source
  pixels), so that an append finds a labels file that changes it.

A withdrawal erases its patients' entries from every index (:func:`erase_keys`): their files
are then unknown, like any other.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from collections.abc import Iterable, Sequence
from json.encoder import encode_basestring_ascii
from pathlib import Path

from shards.atomic import atomic_write_text
from shards.format import FormatError
from shards.versions import VERSIONS_DIR

INDEX_NAME = "sources.json"


def index_rel(version: int) -> str:
    """The index an append writes for ``version``, relative to the dataset root."""
    return f"{VERSIONS_DIR}/v{version:04d}.sources.json"


def label_digest(target: int, class_name: str | None, boxes: Iterable[Sequence[float]]) -> str:
    """A digest of a patient's label as the labels file gives it."""
    rows = [[float(v) for v in b] for b in boxes]
    if not rows:  # most patients: an append digests every patient of its labels file
        return _digest_without_boxes(int(target), class_name)
    return _digest([int(target), class_name, rows])


@functools.lru_cache(maxsize=64)
def _digest_without_boxes(target: int, class_name: str | None) -> str:
    return _digest([target, class_name, []])


def _digest(label: list) -> str:
    return hashlib.sha256(json.dumps(label).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class IndexEntry:
    sha256: str
    """Of the source file."""
    label: str
    """:func:`label_digest` of the sample's label; empty when unknown (:func:`index_from_shards`)."""


@dataclasses.dataclass(frozen=True)
class SourceIndex:
    samples: dict[str, IndexEntry]
    """By sample key."""

    def files(self) -> set[str]:
        """The sha256 of every source file the dataset holds."""
        return {e.sha256 for e in self.samples.values()}

    def merged(self, other: "SourceIndex") -> "SourceIndex":
        return SourceIndex({**self.samples, **other.samples})

    def without(self, keys: set[str]) -> "SourceIndex":
        return SourceIndex({k: e for k, e in self.samples.items() if k not in keys})

    def to_json(self) -> str:
        """``json.dumps({"samples": {key: entry}}, indent=1, sort_keys=True)`` and a newline,
        written entry by entry: an append writes every sample's entry again."""
        if not self.samples:
            return '{\n "samples": {}\n}\n'
        q = encode_basestring_ascii
        body = ",\n".join(f'  {q(k)}: {{\n   "label": {q(e.label)},\n   "sha256": {q(e.sha256)}\n  }}'
                          for k, e in ((k, self.samples[k]) for k in sorted(self.samples)))
        return f'{{\n "samples": {{\n{body}\n }}\n}}\n'

    @classmethod
    def read(cls, path: Path) -> "SourceIndex":
        """Raises :class:`FormatError` on a malformed index."""
        try:
            data = json.loads(path.read_text())
            return cls({str(k): IndexEntry(**e) for k, e in data["samples"].items()})
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
            raise FormatError(f"{path}: not a source index ({exc})") from exc

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, self.to_json())


def read_index(root: Path, version: int) -> SourceIndex | None:
    """The index of ``version`` of the dataset at ``root``: the nearest version at or before it
    that wrote one (a withdrawal writes none), else the first ingest's; None for a dataset made before the
    index existed."""
    candidates = [root / index_rel(n) for n in range(version, 0, -1)] + [root / INDEX_NAME]
    for path in candidates:
        if path.is_file():
            return SourceIndex.read(path)
    return None


def erase_keys(root: Path, keys: set[str]) -> None:
    """Drop the samples ``keys`` from every source index of the dataset at ``root``."""
    for path in [root / INDEX_NAME, *sorted((root / VERSIONS_DIR).glob("v[0-9][0-9][0-9][0-9].sources.json"))]:
        if path.is_file():
            index = SourceIndex.read(path)
            if keys & index.samples.keys():
                index.without(keys).write(path)


def index_from_shards(root: Path, shards: Iterable[str]) -> SourceIndex:
    """The index of a dataset made before the index existed (format 4 or earlier), from its
    samples' JSON: read once, by the first append. The labels it was made with are not
    recoverable exactly (the JSON holds the boxes in output pixels), so they are unknown."""
    from shards.reader import iter_samples

    samples = {}
    for name in shards:
        for sample in iter_samples(root / "shards" / name, decode=False):
            samples[str(sample.meta["key"])] = IndexEntry(str(sample.meta["source"]["sha256"]), "")
    return SourceIndex(samples)
