"""Where a worker gets an input's bytes: a file in the DICOM folder, or a member of the
archive given as ``--dicom-dir`` (:mod:`shards.archive`). Both feed the same decoder.

:func:`open_inputs` hands a shard's inputs over in plan order: from a folder through
:class:`ingest.readahead.ReadAhead`, from an archive through :class:`ArchiveFeed`, which
opens the archive once per shard and reads each member at its offset, asking the kernel for
the next few members' byte ranges ahead of the decoder as the folder read-ahead does for
files. :func:`read_input` reads one input alone (a child process of an isolated shard).
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import Protocol

from ingest.readahead import READ_AHEAD, ReadAhead, read_file
from shards.archive import ArchiveIndex, ArchiveReader


class InputFeed(Protocol):
    """A shard's inputs in plan order (a context manager)."""

    def __enter__(self) -> "InputFeed": ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None: ...

    def next(self, path: str) -> bytes:
        """The bytes of ``path``, the next input of the list; raises the ``OSError`` its
        read met (:class:`shards.archive.MemberError` for a damaged member)."""
        ...


class ArchiveFeed:
    """The members ``paths`` of an archive, in order, the next ``depth`` hinted to the kernel.

    An archive that cannot be opened makes each member's read raise that ``OSError`` at its
    turn, as a vanished file does in a folder: every input still ends as one reject.
    """

    def __init__(self, index: ArchiveIndex, paths: list[str], depth: int = READ_AHEAD) -> None:
        self._index = index
        self._names = list(paths)
        self._depth = depth
        self._taken = 0
        self._reader: ArchiveReader | None = None
        self._error: OSError | None = None

    def __enter__(self) -> "ArchiveFeed":
        try:
            self._reader = ArchiveReader(self._index)
        except OSError as exc:
            self._error = exc
            return self
        for name in self._names[: self._depth]:
            self._reader.hint(self._index.members[name])
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._reader is not None:
            self._reader.close()

    def next(self, path: str) -> bytes:
        if self._taken >= len(self._names):
            raise LookupError(f"{path}: asked for more members than were listed")
        expected = self._names[self._taken]
        if expected != path:
            raise LookupError(f"{path}: asked out of order; the next member listed is {expected}")
        self._taken += 1
        if self._reader is None:
            assert self._error is not None
            raise self._error
        ahead = self._taken + self._depth - 1
        if ahead < len(self._names):
            self._reader.hint(self._index.members[self._names[ahead]])
        return self._reader.read(self._index.members[path])


def open_inputs(dicom_dir: str, archive: ArchiveIndex | None, paths: list[str]) -> InputFeed:
    """The feed of ``paths``: members of ``archive`` when given, else files under ``dicom_dir``."""
    if archive is not None:
        return ArchiveFeed(archive, paths)
    return ReadAhead(dicom_dir, paths)


def read_input(dicom_dir: str, archive: ArchiveIndex | None, path: str) -> bytes:
    """The bytes of one input (raises ``OSError``, :class:`shards.archive.MemberError` included)."""
    if archive is None:
        return read_file(str(Path(dicom_dir) / path))
    with ArchiveReader(archive) as reader:
        return reader.read(archive.members[path])
