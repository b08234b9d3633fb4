"""Read a shard's DICOM files a few ahead of the decoder, so that it never waits on the disk.

A worker that reads each file only when it is about to decode it stalls for the whole read
whenever the file is not in the page cache: the first ingest of a dataset, or any file the
kernel evicted while 11 GB of shards went past it. On the 26,684-file set with part of the
inputs evicted, 2 workers spent 39 of 204 core-seconds in iowait (``/proc/stat``).

A thread of the shard's own asks the kernel for the next few files
(``posix_fadvise(POSIX_FADV_WILLNEED)``, which starts their reads and returns), and the
decoder's thread reads each file itself at its turn, from the page cache. Reading the bytes
in helper threads and handing them over cost 0.3 ms of CPU per file on a 2-core VM, three
times a plain read: a thread woken per file, the GIL handed back and forth. The hints cost a
tenth of that, and the helper wakes once every few files.

Each file is read once, whole, in plan order, by the thread that decodes it: a read that
fails raises its ``OSError`` at its own turn, and one that hangs hangs at its own turn, under
the same watchdog as a hanging decode. A hint that fails is ignored (the read at its turn
meets the same error); one that hangs holds up only the hints. Where the platform has no
``posix_fadvise``, or a filesystem ignores the hint (some parallel filesystems keep a cache
of their own), every file is read at its turn: the same bytes, only slower from a cold disk.
"""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path
from types import TracebackType

READ_AHEAD = 8
"""Files asked for ahead of the decoder, at most: enough to cover a read slower than a
decode (a cold disk, a parallel filesystem). They wait in the page cache, not in the worker."""
_WILLNEED = getattr(os, "POSIX_FADV_WILLNEED", None)


def read_file(path: str) -> bytes:
    """The whole file at ``path``: one ``open`` and the reads of ``FileIO.readall`` (the
    pathlib and buffered layers of ``Path.read_bytes`` cost a third more here)."""
    with open(path, "rb", buffering=0) as f:
        return f.readall()


def hint(path: str) -> None:
    """Ask the kernel to start reading the regular file at ``path`` into the page cache; any
    error is left for the read itself to meet."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)  # a FIFO must not block
    except OSError:
        return
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.posix_fadvise(fd, 0, 0, _WILLNEED)  # type: ignore[arg-type]
    except OSError:
        pass
    finally:
        os.close(fd)


class ReadAhead:
    """Hands over the bytes of ``paths`` (under ``root``) in order, the next ``depth`` files
    asked of the kernel ahead of the caller.

    Use as a context manager; :meth:`next` returns the next file's bytes, or raises the
    ``OSError`` its read met.
    """

    def __init__(self, root: Path | str, paths: list[str], depth: int = READ_AHEAD) -> None:
        if depth < 2:
            raise ValueError(f"depth must be >= 2, got {depth}")
        self._names = list(paths)
        self._paths = [os.path.join(root, p) for p in self._names]
        self._taken = 0
        self._depth = depth
        self._batch = depth // 2
        """The helper hints this many files per wake-up: the caller is always between
        ``depth - batch`` and ``depth`` files behind the hints."""
        self._turns = threading.Semaphore(0)
        self._closed = False

    def __enter__(self) -> "ReadAhead":
        if _WILLNEED is not None and self._paths:
            threading.Thread(target=self._hint_ahead, name="pneumo-readahead", daemon=True).start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        # Not joined: a hint that hangs must not hold the shard's result back once it is written.
        self._closed = True
        self._turns.release()

    def _hint_ahead(self) -> None:
        for start in range(0, len(self._paths), self._batch):
            if start >= self._depth:
                self._turns.acquire()  # the caller has taken another batch
            if self._closed:
                return
            for path in self._paths[start : start + self._batch]:
                hint(path)

    def next(self, path: str) -> bytes:
        """The bytes of ``path``, which must be the next file of the list."""
        if self._taken >= len(self._names):
            raise LookupError(f"{path}: asked for more files than were listed")
        expected = self._names[self._taken]
        if expected != path:
            raise LookupError(f"{path}: asked out of order; the next file listed is {expected}")
        self._taken += 1
        if self._taken % self._batch == 0:
            self._turns.release()
        return read_file(self._paths[self._taken - 1])
