"""A node-local cache of fetched shards, shared by the ranks of a node, and a prefetcher.

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
  or fetched ahead is held whole (``(1 + PREFETCH_DEPTH) x`` shard bytes per lane, about
  0.3 GB per lane with 256-sample shards).
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

import atexit
import concurrent.futures
import dataclasses
import errno
import fcntl
import hashlib
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
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
    open_store,
    remote_error,
    retrying,
)

log = logging.getLogger(__name__)

PREFETCH_DEPTH = 2
"""Shards of a lane fetched ahead of the one being read."""
FETCH_THREADS = 2
"""Shards of a lane fetched at once. A lane's shuffle window spans several shards, all of which
a cold epoch must fetch before its first batch; one fetch at a time per lane left a core idle
for part of that wait (``python -m shards.bench --sections remote``)."""


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
            raise _cache_error(self.root, exc, "cannot create the cache folders") from exc

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
                give_up=_tries_failed(url),
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


def _tries_failed(url: str) -> Callable[[BaseException], ShardFetchError]:
    """The error of a download that failed every try, from its last fault."""
    return lambda last: ShardFetchError(
        f"{url}: {FETCH_ATTEMPTS} tries failed; the last: {str(remote_error(url, last)).split(': ', 1)[-1]}")


def _cache_error(root: Path, exc: OSError, what: str) -> OSError:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return CacheFullError(exc.errno, f"cache {root}: no space left on the device ({what})")
    return OSError(exc.errno, f"cache {root}: {what}: {exc.strerror}")


# --------------------------------------------------------------------------- sources


@dataclasses.dataclass(frozen=True)
class ShardSource:
    """Where a loader gets each shard file: the dataset folder itself, or the cache.

    Picklable: DataLoader workers receive a copy and fetch through the same cache folder.
    """

    store: Store
    cache: ShardCache | None = None
    """None: read shards in place (local datasets without ``--cache-dir``)."""

    @property
    def display(self) -> str:
        return self.store.display

    def prefetcher(self, shards: Sequence[ShardInfo], depth: int = PREFETCH_DEPTH) -> "Prefetcher":
        """``shards`` in order, fetched and checked ``depth`` ahead in the background."""
        return Prefetcher(self, list(shards), depth)

    def discard(self, shard: ShardInfo) -> None:
        """Forget a cached copy that failed its check while it was read."""
        if self.cache is not None:
            self.cache.discard(shard)


def open_source(location: str | Path, *, cache_dir: Path | str | None = None,
                cache_limit_gb: float | None = None) -> ShardSource:
    """The :class:`ShardSource` for ``--data location`` with the cache options.

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
        return ShardSource(store, ShardCache(Path(cache_dir), limit))
    if store.local is not None:
        return ShardSource(store, None)
    tmp = Path(tempfile.mkdtemp(prefix="pneumo-shards-"))
    atexit.register(shutil.rmtree, tmp, True)
    log.info("no --cache-dir: shards of %s pass through %s (removed at exit)", store.display, tmp)
    return ShardSource(store, ShardCache(tmp, 0))


class Prefetcher:
    """Hands out a lane's shards in order, fetching (and checking) ahead on
    :data:`FETCH_THREADS` threads.

    Use :meth:`get` for each shard in turn (a context manager holding the copy), and
    :meth:`close` at the end (also releases what was fetched but never read).
    """

    def __init__(self, source: ShardSource, shards: list[ShardInfo], depth: int) -> None:
        self.source, self.shards, self.depth = source, shards, max(0, depth)
        self._futures: dict[int, concurrent.futures.Future[tuple[int, VerifiedShard]]] = {}
        self._pool = (concurrent.futures.ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="shard-prefetch")
                      if source.cache is not None else None)
        self._submitted = 0

    def _submit(self, upto: int) -> None:
        assert self._pool is not None and self.source.cache is not None
        for i in range(self._submitted, min(upto, len(self.shards))):
            self._futures[i] = self._pool.submit(self.source.cache.acquire, self.source.store, self.shards[i])
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
        if self.source.cache is None:
            local = self.source.store.local
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


# --------------------------------------------------------------------------- whole datasets


def copy_dataset(store: Store, dest: Path, *, shards: bool = True, progress: bool = False) -> list[str]:
    """Copy a remote dataset's files into ``dest`` as they are (nothing is checked here: the
    copy is for ``python -m shards verify|stats``, which check it); return what was missing.

    Copies ``manifest.json``, ``rejects.jsonl``, ``labels.zarr/`` and, with ``shards``, every
    file the server lists under ``shards/`` (or, when it cannot list, the manifest's shards).
    Each file is retried like a shard fetch.

    Raises:
        DatasetNotFoundError: No ``manifest.json`` at the URL.
        ShardFetchError, CacheFullError: As for a shard fetch.
    """
    from shards.manifest import LABELS_NAME, MANIFEST_NAME, REJECTS_NAME
    from shards.store import read_manifest_from

    manifest = read_manifest_from(store)  # a wrong URL fails here, with its one-line reason
    dest.mkdir(parents=True, exist_ok=True)
    rels = [MANIFEST_NAME, REJECTS_NAME]
    try:
        rels += [f"{LABELS_NAME}/{p}" for p in _walk(store, LABELS_NAME)]
    except (FileNotFoundError, NotImplementedError, ValueError):
        rels += [f"{LABELS_NAME}/zarr.json"]  # verify then names what is missing
    if shards:
        names = store.list_shards()
        rels += [f"{SHARDS_DIR}/{n}" for n in (names if names is not None else [s.name for s in manifest.shards])]
    from tqdm import tqdm

    missing = []
    for rel in tqdm(rels, desc=f"copy {store.display}", unit="file", disable=not progress):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            _copy_file(store, rel, dest / rel)
        except DatasetNotFoundError:
            missing.append(rel)
    return missing


def _walk(store: Store, rel: str) -> list[str]:
    """Paths of the files under ``rel``, relative to it."""
    base = store.path(rel).rstrip("/")
    out = []
    for p in store.fs.find(base):
        p = str(p)
        if not p.startswith(base):  # http lists absolute URLs
            p = base + "/" + p.split(f"/{rel}/", 1)[-1]
        sub = p[len(base):].lstrip("/")
        if sub:
            out.append(sub)
    return sorted(out)


def _copy_file(store: Store, rel: str, dest: Path) -> None:
    url = store.url(rel)

    def attempt() -> None:
        try:
            with atomic_path(dest, durable=False) as tmp:
                store.fs.get_file(store.path(rel), str(tmp))
        except FileNotFoundError as exc:
            raise DatasetNotFoundError(f"{url}: not found") from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise _cache_error(dest.parent, exc, f"writing {url}") from exc
            raise

    retrying(url, attempt, not_retried=(DatasetNotFoundError, CacheFullError),
             give_up=_tries_failed(url))


@contextmanager
def local_copy(location: str | Path, *, shards: bool = True, work_dir: Path | None = None,
               progress: bool = False) -> Iterator[tuple[Path, str]]:
    """``(folder, display)``: the dataset itself when local, else a temporary copy of it
    (removed on exit) and its redacted URL."""
    store = open_store(location)
    if store.local is not None:
        yield store.local, store.display
        return
    tmp = Path(tempfile.mkdtemp(prefix="pneumo-copy-", dir=work_dir))
    try:
        log.info("copying %s to %s", store.display, tmp)
        copy_dataset(store, tmp / "ds", shards=shards, progress=progress)
        yield tmp / "ds", store.display
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
