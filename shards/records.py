"""The records an ingest hands from its workers to its driver, and that the verifier reads back:
a file that did not become a sample (:class:`Reject`), and a built shard (:class:`ShardRecord`).

Label problems are :class:`shards.label_csv.LabelProblem`; the label table's row is
:class:`shards.labels.LabelRow`; the shard as the manifest records it is
:class:`shards.manifest.ShardInfo`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from shards.label_csv import LabelProblem
from shards.manifest import ShardInfo


@dataclasses.dataclass(frozen=True)
class Reject:
    """An input file that did not become a sample; one line of ``rejects.jsonl``."""

    path: str
    reason: str
    detail: str
    sha256: str | None = None
    """Of the file's bytes, when the decoder judged them (it raised a named reject): the same
    bytes under the same parameters get the same verdict, so an append skips them. None when
    the verdict does not follow from the bytes alone: unreadable, crashed, timed out, an
    exception the decoder did not foresee, or judged by the plan (``no_label``, ``duplicate_*``)."""

    def to_json(self) -> dict[str, Any]:
        line = {"kind": "file", **dataclasses.asdict(self)}
        if self.sha256 is None:
            del line["sha256"]
        return line


@dataclasses.dataclass(frozen=True, kw_only=True)
class BuildStats:
    """How one shard was built: for the summary and the benchmarks, never part of the dataset."""

    fast_path: int
    """Samples whose JPEG frame libjpeg decoded straight from the file."""
    isolated: bool
    """Built file by file in isolated processes."""
    seconds: float
    cpu_seconds: float
    """Of the whole worker process, helper threads included (one task runs at a time)."""
    started: float
    """Wall-clock time (``time.time()``) when the build started."""
    finished: float
    worker_pid: int
    max_rss_mb: float


@dataclasses.dataclass(frozen=True, kw_only=True)
class ShardRecord:
    """One built shard: the shard itself, its samples' JSON in shard order, the files rejected
    and the label problems found while building it."""

    info: ShardInfo
    metas: tuple[dict[str, Any], ...]
    rejects: tuple[Reject, ...]
    problems: tuple[LabelProblem, ...]
    stats: BuildStats

    @property
    def name(self) -> str:
        return self.info.name

    def to_json(self) -> dict[str, Any]:
        return {
            "info": dataclasses.asdict(self.info),
            "metas": list(self.metas),
            "rejects": [dataclasses.asdict(r) for r in self.rejects],
            "problems": [dataclasses.asdict(p) for p in self.problems],
            "stats": dataclasses.asdict(self.stats),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "ShardRecord":
        """Raises KeyError or TypeError on a malformed record."""
        info, xxh3 = data["info"], data["info"].get("xxh3")
        return cls(
            info=ShardInfo(**{**info, "xxh3": None if xxh3 is None else tuple(tuple(pair) for pair in xxh3)}),
            metas=tuple(data["metas"]),
            rejects=tuple(Reject(**r) for r in data["rejects"]),
            problems=tuple(LabelProblem(**p) for p in data["problems"]),
            stats=BuildStats(**data["stats"]),
        )
