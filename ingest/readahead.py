"""Read a shard's DICOM files a few ahead of the decoder, so that it never waits on the disk.

A worker that reads each file only when it is about to decode it stalls for the whole read
whenever the file is not in the page cache: the first ingest of a dataset, or any file the
kernel evicted while 11 GB of shards went past it. On the 26,684-file set with part of the
inputs evicted, 2 workers spent 39 of 204 core-seconds in iowait (``/proc/stat``). Reads
release the GIL, so a couple of threads reading a few files ahead overlap that wait with the
decoding of the files before.

Each file is still read once and whole, and in plan order; its bytes are handed over in the
same order. A read that fails raises its ``OSError`` when its file's turn comes, and one that
hangs makes the decoder wait on it at its turn, under the same watchdog as a hanging decode.
"""

from __future__ import annotations

import collections
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType

READ_AHEAD = 4
"""Files in flight ahead of the decoder: enough to cover a read slower than a decode (a cold
disk, a parallel filesystem), few enough that a shard of 50 MB files holds 200 MB at most."""
READ_THREADS = 2
"""Reads that may wait on the storage at once, per worker."""


class ReadAhead:
    """Hands over the bytes of ``paths`` (under ``root``) in order, reading ahead of the caller.

    Use as a context manager; :meth:`next` returns the next file's bytes, or raises the
    ``OSError`` its read met.
    """

    def __init__(self, root: Path | str, paths: list[str], depth: int = READ_AHEAD, threads: int = READ_THREADS) -> None:
        if depth < 1 or threads < 1:
            raise ValueError(f"depth and threads must be >= 1, got {depth} and {threads}")
        self._root = Path(root)
        self._todo = collections.deque(paths)
        self._depth = depth
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="pneumo-readahead")
        self._inflight: collections.deque[tuple[str, Future[bytes]]] = collections.deque()

    def __enter__(self) -> "ReadAhead":
        self._fill()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        # Not waiting: a read that hangs must not hold the shard's result back once it is written.
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _fill(self) -> None:
        while self._todo and len(self._inflight) < self._depth:
            path = self._todo.popleft()
            self._inflight.append((path, self._pool.submit((self._root / path).read_bytes)))

    def next(self, path: str) -> bytes:
        """The bytes of ``path``, which must be the next file of the list."""
        if not self._inflight:
            raise LookupError(f"{path}: asked for more files than were listed")
        expected, future = self._inflight.popleft()
        if expected != path:
            raise LookupError(f"{path}: asked out of order; the next file listed is {expected}")
        self._fill()
        return future.result()
