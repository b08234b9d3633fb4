"""A node-local cache of fetched shards, shared by the ranks of a node.

Layout of ``--cache-dir DIR``::

    DIR/shards/<sha256>.tar     one verified shard, named by the manifest's sha256 of it
    DIR/locks/<sha256>.lock     the flock(2) that guards it (empty file)

Naming a copy by its content means a re-ingested dataset (new bytes, new sha256) can never be
served a stale copy, and two URLs of the same dataset share the copies. The promises:

* **Atomic writes.** A shard is downloaded to a temporary name beside its final one, read
  back and hashed, and renamed into place only if its size and sha256 are the manifest's; a
  killed download leaves a temporary file that the next fetch of that shard removes. There
  is no fsync: a copy torn by a crash fails the check before its next use and is fetched again.
* **Re-checked before reuse, hashed once per read.** A copy found in the cache is read whole
  into memory and hashed, and compared with the manifest before any of it is handed out; a
  copy that differs is dropped and fetched again. A download is read back from its
  temporary file the same way. Either way the reader gets those very bytes as a
  :class:`shards.reader.VerifiedShard` and parses them without hashing them again: every
  byte is hashed exactly once per read (as for a local dataset, whose reader hashes what it
  streams), the bytes parsed are the bytes hashed (no re-read of the file after the check),
  and nothing of a damaged copy is ever yielded. The price is memory: each shard being read
  or fetched ahead is held whole (``(1 + shards.prefetch.PREFETCH_DEPTH) x`` shard bytes
  per lane, about 0.3 GB per lane with 256-sample shards).
* **Shared by the ranks of a node.** A process fetches a shard holding an exclusive lock on
  its lock file; another process that needs it meanwhile waits on that lock and then finds
  it in place: each shard is fetched once per node. Readers hold a shared lock while they
  use a copy, so eviction never removes a shard in use.
* **Bounded.** With ``limit_bytes``, the least recently used copies that nobody holds are
  deleted after each fetch until the cache fits (a copy in use may make it overshoot).

Network faults: a connection refused, reset or dropped mid-shard is retried
(:data:`FETCH_ATTEMPTS` attempts, with back-off) and then reported with
:class:`ShardFetchError` naming the URL; a shard served whole with other bytes raises
:class:`shards.reader.ShardChecksumError` at once (another attempt would get the same bytes);
a full disk raises :class:`CacheFullError` naming the cache folder.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from shards.atomic import atomic_path
from shards.manifest import SHARDS_DIR, ShardInfo
from shards.reader import ShardChecksumError, VerifiedShard
from shards.store import (
    FETCH_ATTEMPTS,
    DatasetNotFoundError,
    RemoteReadError,
    Store,
    remote_error,
    retrying,
)

log = logging.getLogger(__name__)



class CacheFullError(OSError):
    """The cache's filesystem ran out of space while a shard was being written."""


class ShardFetchError(RemoteReadError):
    """A shard could not be fetched after :data:`FETCH_ATTEMPTS` tries (network faults)."""


@dataclasses.dataclass(frozen=True)
class ShardCache:
    """A cache folder (see the module docstring); safe to share between processes."""

    root: Path
    limit_bytes: int | None = None
    """Keep at most this many bytes of shards that nobody holds (None: no limit)."""

    def __post_init__(self) -> None:
        if self.limit_bytes is not None and self.limit_bytes < 0:
            raise ValueError(f"cache limit {self.limit_bytes} bytes: must be >= 0")

    def path_of(self, shard: ShardInfo) -> Path:
        return self.root / SHARDS_DIR / f"{shard.sha256}.tar"

    def _lock_path(self, shard: ShardInfo) -> Path:
        return self.root / "locks" / f"{shard.sha256}.lock"

    @contextmanager
    def _fetch_lock(self, shard: ShardInfo) -> Iterator[None]:
        """Exclusive right to fetch ``shard`` into this cache (across processes and threads)."""
        fd = os.open(self.root / "locks" / f"{shard.sha256}.fetch", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _prepare(self) -> None:
        try:
            (self.root / SHARDS_DIR).mkdir(parents=True, exist_ok=True)
            (self.root / "locks").mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise cache_error(self.root, exc, "cannot create the cache folders") from exc

    @contextmanager
    def hold(self, store: Store, shard: ShardInfo) -> Iterator[Path]:
        """A verified local copy of ``shard``, fetched if needed, held (not evictable) inside."""
        fd, _ = self.acquire(store, shard)
        try:
            yield self.path_of(shard)
        finally:
            os.close(fd)

    def acquire(self, store: Store, shard: ShardInfo) -> tuple[int, VerifiedShard]:
        """Make sure a verified copy of ``shard`` is in the cache; return the open lock file
        descriptor that holds it (shared lock; close it to release the copy) and the copy's
        bytes, hashed once here against the manifest (the reader does not hash them again)."""
        self._prepare()
        fd = os.open(self._lock_path(shard), os.O_RDWR | os.O_CREAT, 0o644)
        path = self.path_of(shard)
        try:
            # Two locks per shard. The hold lock is only ever taken shared, by everyone who
            # uses the copy, and exclusive (non-blocking) by eviction alone. Fetching takes the
            # fetch lock exclusive: one fetch per shard per node, and a waiting fetcher waits
            # only for another fetch, never for a holder. (Upgrading the hold lock to fetch
            # deadlocked: two lanes of one rank, or two ranks in a collective, each holding
            # the shard shared while one waited for exclusive.)
            fcntl.flock(fd, fcntl.LOCK_SH)
            fetched = False
            verified = self._valid_copy(path, shard, store)
            if verified is None:
                with self._fetch_lock(shard):
                    # Another lane or rank may have fetched it meanwhile (hashing a copy twice
                    # happens only on this rare path, or after a damaged copy).
                    verified = self._valid_copy(path, shard, store)
                    if verified is None:
                        verified = self._fetch(store, shard, path)
                        fetched = True
            st = path.stat()
            os.utime(path, (time.time(), st.st_mtime))  # atime = last use, for the LRU order
            if fetched and self.limit_bytes is not None:
                self.evict(self.limit_bytes)
            return fd, verified
        except BaseException:
            os.close(fd)
            raise

    def discard(self, shard: ShardInfo) -> None:
        """Drop the copy of ``shard`` (found damaged while it was read)."""
        self.path_of(shard).unlink(missing_ok=True)


    def _valid_copy(self, path: Path, shard: ShardInfo, store: Store) -> VerifiedShard | None:
        """The cached copy read whole and hashed, or None when it is missing or differs."""
        try:
            buf, got = _read_whole(path, shard.bytes)
        except FileNotFoundError:
            return None
        if got == shard.bytes:
            verified = _verified(shard, buf, hashlib.sha256(buf[:got]).hexdigest())
            if verified is not None:
                return verified
        log.warning("cached copy of %s differs from the manifest: fetching it again", store.shard_url(shard.name))
        return None

    def _fetch(self, store: Store, shard: ShardInfo, path: Path) -> VerifiedShard:
        url = store.shard_url(shard.name)
        # We hold the fetch lock: temporary files of downloads killed before their rename are
        # nobody's, and a damaged copy is useless to everyone (holders keep the bytes they
        # checked in memory; nobody reads a copy by path after its check).
        path.unlink(missing_ok=True)
        for stale in path.parent.glob(f".{path.name}.tmp-*"):
            stale.unlink(missing_ok=True)
        t0 = time.perf_counter()
        # No fsync: a copy is hashed before any reuse, so a torn one is fetched again.
        with atomic_path(path, durable=False) as tmp:
            digest, buf, got = retrying(
                url, lambda: self._download(store, shard, tmp),
                not_retried=(DatasetNotFoundError, CacheFullError, PermissionError),
                give_up=tries_failed(url),
            )
            verified = _verified(shard, buf, digest) if got == shard.bytes else None
            if verified is None:
                raise ShardChecksumError(url, shard.sha256, digest)
        log.debug("fetched %s (%.1f MB) in %.2f s", url, got / 1e6, time.perf_counter() - t0)
        return verified

    def _download(self, store: Store, shard: ShardInfo, tmp: Path) -> tuple[str, memoryview, int]:
        """One try: download the shard into ``tmp``, then read it back whole and hash it;
        return (sha256, the bytes, how many arrived).

        The download is the filesystem's own ``get_file``: the whole transfer runs as one
        task on fsspec's event loop, which writes each piece to the file as it arrives.
        Reading the shard through a file object instead costs a round trip to that loop
        per piece the server's connection happens to hold (aiohttp hands out 64-256 KB at a
        time: hundreds per shard), each joined into a new ``bytes``; the loader ran 1.3x
        faster on a cold cache without it (``python -m shards.bench --sections remote``).
        Reading the copy back from the page cache and hashing it on this thread costs less
        than those round trips, and the hash is of the very bytes kept.
        """
        src_path = store.path(f"{SHARDS_DIR}/{shard.name}")
        try:
            store.fs.get_file(src_path, str(tmp))
            buf, got = _read_whole(tmp, shard.bytes)
        except FileNotFoundError as exc:
            raise DatasetNotFoundError(f"{store.shard_url(shard.name)}: not found (listed in the manifest)") from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise CacheFullError(
                    exc.errno, f"cache {self.root}: no space left on the device while writing "
                    f"{store.shard_url(shard.name)} ({shard.bytes / 1e6:.1f} MB): free space there, "
                    "lower --cache-limit, or choose another --cache-dir") from exc
            raise
        if got < shard.bytes:
            raise ConnectionError(f"the connection ended after {got} of {shard.bytes} bytes")
        return hashlib.sha256(buf[:got]).hexdigest(), buf, got

    def evict(self, limit_bytes: int) -> int:
        """Delete least recently used copies nobody holds until at most ``limit_bytes`` remain;
        return the bytes kept."""
        entries = []
        for p in (self.root / SHARDS_DIR).glob("*.tar"):
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            entries.append((st.st_atime, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        for _, size, p in sorted(entries):
            if total <= limit_bytes:
                break
            lock = self.root / "locks" / f"{p.stem}.lock"
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue  # in use by some process
            try:
                p.unlink(missing_ok=True)
                total -= size
                log.debug("evicted %s (%.1f MB) from %s", p.name, size / 1e6, self.root)
            finally:
                os.close(fd)
        if total > limit_bytes:
            log.debug("cache %s holds %.1f MB in use, above its %.1f MB limit",
                      self.root, total / 1e6, limit_bytes / 1e6)
        return total


def _read_whole(path: Path, size: int) -> tuple[memoryview, int]:
    """The file's first ``size + 1`` bytes (one more than expected: a longer file is caught)
    in a fresh buffer, and how many there were."""
    buf = _uninitialized(size + 1)
    got = 0
    with open(path, "rb", buffering=0) as f:
        while got < len(buf) and (n := f.readinto(buf[got:])):
            got += n
    return buf, got


def _uninitialized(n: int) -> memoryview:
    """``n`` writable bytes of undefined content, for a shard read or fetched whole.

    ``bytearray(n)`` first zeroes them: for a 26 MB shard 3.4 ms of memset with the GIL held,
    on the thread that fetches while the reader waits for it, and every byte is then
    overwritten (or cut off by the caller's count of the bytes that arrived).
    """
    return memoryview(np.empty(n, dtype=np.uint8))


def _verified(shard: ShardInfo, buf: memoryview, digest: str) -> VerifiedShard | None:
    """``buf[:shard.bytes]``, just hashed to ``digest``, as a :class:`VerifiedShard` if that is
    the manifest's sha256 (else None). The caller must drop ``buf``: the read-only view is
    then the only way to its bytes, so they cannot change after the check."""
    if digest != shard.sha256:
        return None
    return VerifiedShard(shard.name, digest, buf[: shard.bytes].toreadonly())


def tries_failed(url: str) -> Callable[[BaseException], ShardFetchError]:
    """The error of a download that failed every try, from its last fault."""
    return lambda last: ShardFetchError(
        f"{url}: {FETCH_ATTEMPTS} tries failed; the last: {str(remote_error(url, last)).split(': ', 1)[-1]}")


def cache_error(root: Path, exc: OSError, what: str) -> OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheFullError(exc.errno, f"cache {root}: no space left on the device ({what})")
    return OSError(exc.errno, f"cache {root}: {what}: {exc.strerror}")


def drop_unlisted(cache: ShardCache, store: Store) -> int:
    """Delete the cached copies of the shards that only unavailable versions of the dataset
    list (a withdrawal deleted them at the source: erasure reaches this node when a reader
    opens the dataset next); return how many went. A dataset of one version has none."""
    from shards.store import list_records_from, read_latest_manifest

    if read_latest_manifest(store).version == 1 or not (cache.root / SHARDS_DIR).is_dir():
        return 0
    records = list_records_from(store)
    kept = {s.sha256 for r in records if r.unavailable is None for s in r.manifest.shards}
    gone = {s.sha256: s for r in records if r.unavailable is not None for s in r.manifest.shards}
    dropped = 0
    for sha, shard in gone.items():
        if sha in kept or not cache.path_of(shard).exists():
            continue
        cache._prepare()
        with cache._fetch_lock(shard):
            cache.discard(shard)
        dropped += 1
    if dropped:
        log.info("%s: dropped %d cached shards that no kept version lists", store.display, dropped)
    return dropped
