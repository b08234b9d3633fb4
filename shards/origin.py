"""Where a reader gets a dataset's shards: the dataset folder itself, or a node cache of a
remote one (:mod:`shards.cache`), and how ``--data LOCATION`` with the cache options opens it.

"Origin", not "source": :mod:`shards.source` is the DICOM input of an ingest.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from shards.cache import ShardCache, drop_unlisted
from shards.manifest import ShardInfo
from shards.prefetch import PREFETCH_DEPTH, Prefetcher
from shards.store import Store, open_store

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ShardOrigin:
    """Where a loader gets each shard file: the dataset folder itself, or the cache.

    Picklable: DataLoader workers receive a copy and fetch through the same cache folder.
    """

    store: Store
    cache: ShardCache | None = None
    """None: read shards in place (local datasets without ``--cache-dir``)."""

    @property
    def display(self) -> str:
        return self.store.display

    def prefetcher(self, shards: Sequence[ShardInfo], depth: int = PREFETCH_DEPTH) -> Prefetcher:
        """``shards`` in order, fetched and checked ``depth`` ahead in the background."""
        return Prefetcher(self, list(shards), depth)

    def discard(self, shard: ShardInfo) -> None:
        """Forget a cached copy that failed its check while it was read."""
        if self.cache is not None:
            self.cache.discard(shard)


def open_origin(location: str | Path, *, cache_dir: Path | str | None = None,
                cache_limit_gb: float | None = None) -> ShardOrigin:
    """The :class:`ShardOrigin` for ``--data location`` with the cache options.

    A remote dataset without ``cache_dir`` gets a private temporary cache that keeps only
    the shards in use and is removed when this process exits.

    Raises:
        ValueError: An unsupported URL scheme, a negative limit.
    """
    store = open_store(location)
    if cache_limit_gb is not None and cache_limit_gb < 0:
        raise ValueError(f"--cache-limit {cache_limit_gb}: must be >= 0 GB")
    limit = None if cache_limit_gb is None else int(cache_limit_gb * 1e9)
    if cache_dir is not None:
        cache = ShardCache(Path(cache_dir), limit)
        drop_unlisted(cache, store)
        return ShardOrigin(store, cache)
    if store.local is not None:
        return ShardOrigin(store, None)
    tmp = Path(tempfile.mkdtemp(prefix="pneumo-shards-"))
    atexit.register(shutil.rmtree, tmp, True)
    log.info("no --cache-dir: shards of %s pass through %s (removed at exit)", store.display, tmp)
    return ShardOrigin(store, ShardCache(tmp, 0))
