"""What every section of ``python -m shards.bench`` shares: the dataset it measures and the
table it prints (a module of its own, so that sections in other modules, such as
:mod:`shards.remote_bench`, and the bench that lists them do not import each other)."""

from __future__ import annotations

import dataclasses
from pathlib import Path


@dataclasses.dataclass(frozen=True)
class BenchData:
    """The dataset every section measures."""

    out: Path
    """The ingested dataset folder."""
    shard_files: list[Path]
    samples: int
    bytes: int
    cores: int


@dataclasses.dataclass
class Section:
    """One printed table: a title, a header, rows and notes below it."""

    title: str
    header: list[str]
    rows: list[list[str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def markdown(self) -> str:
        widths = [max(len(r[i]) for r in (self.header, *self.rows)) for i in range(len(self.header))]
        line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
        out = [f"### {self.title}", "", line(self.header), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        out += [line(r) for r in self.rows]
        return "\n".join(out + ([""] + self.notes if self.notes else []))
