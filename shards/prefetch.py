"""Hands out a lane's shards in order, fetching (and checking) the next ones ahead through
the node cache (:mod:`shards.cache`) while the current one is read."""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from shards.manifest import SHARDS_DIR, ShardInfo
from shards.reader import VerifiedShard

if TYPE_CHECKING:
    from shards.origin import ShardOrigin

PREFETCH_DEPTH = 2
"""Shards of a lane fetched ahead of the one being read."""
FETCH_THREADS = 2
"""Shards of a lane fetched at once. A lane's shuffle window spans several shards, all of which
a cold epoch must fetch before its first batch; one fetch at a time per lane left a core idle
for part of that wait (``python -m shards.bench --sections remote``)."""


class Prefetcher:
    """Hands out a lane's shards in order, fetching (and checking) ahead on
    :data:`FETCH_THREADS` threads.

    Use :meth:`get` for each shard in turn (a context manager holding the copy), and
    :meth:`close` at the end (also releases what was fetched but never read).
    """

    def __init__(self, origin: ShardOrigin, shards: list[ShardInfo], depth: int) -> None:
        self.origin, self.shards, self.depth = origin, shards, max(0, depth)
        self._futures: dict[int, concurrent.futures.Future[tuple[int, VerifiedShard]]] = {}
        self._pool = (concurrent.futures.ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="shard-prefetch")
                      if origin.cache is not None else None)
        self._submitted = 0

    def _submit(self, upto: int) -> None:
        assert self._pool is not None and self.origin.cache is not None
        for i in range(self._submitted, min(upto, len(self.shards))):
            self._futures[i] = self._pool.submit(self.origin.cache.acquire, self.origin.store, self.shards[i])
        self._submitted = max(self._submitted, min(upto, len(self.shards)))

    def start(self) -> None:
        """Begin fetching the first shards now (before the first :meth:`get`)."""
        if self._pool is not None:
            self._submit(1 + self.depth)

    @contextmanager
    def get(self, i: int) -> Iterator[Path | VerifiedShard]:
        """Shard ``i`` (in the order given) for :func:`shards.reader.iter_samples`: its path in
        the dataset folder (the reader hashes it), or its cached copy's bytes, already checked
        (held in the cache while inside)."""
        shard = self.shards[i]
        if self.origin.cache is None:
            local = self.origin.store.local
            assert local is not None
            yield local / SHARDS_DIR / shard.name
            return
        self._submit(i + 1 + self.depth)
        fd, verified = self._futures.pop(i).result()
        try:
            yield verified
        finally:
            os.close(fd)

    def close(self) -> None:
        if self._pool is None:
            return
        for f in self._futures.values():
            f.cancel()
        self._pool.shutdown(wait=True)
        for f in self._futures.values():
            if not f.cancelled() and f.exception() is None:
                os.close(f.result()[0])
        self._futures.clear()
