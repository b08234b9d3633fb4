"""Deterministic webdataset tar shard writer."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import mmap
import os
import tarfile
import threading
import uuid
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from shards.checksum import digest_of
from shards.format import (
    IMAGE_EXT,
    META_EXT,
    TAR_MODE,
    TAR_MTIME,
    check_key,
    encode_meta,
    image_parts,
)
from shards.manifest import ShardInfo


def _tarfile_header(name: str, size: int) -> bytes:
    """The header ``tarfile`` writes in PAX format for a regular file with the fixed fields
    (a PAX extended header first where the name or size does not fit ustar's fields)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mtime = TAR_MTIME
    info.mode = TAR_MODE
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "strict")


_NAME_MAX, _SIZE, _CHKSUM = 100, slice(124, 136), slice(148, 156)
"""Fields of a ustar header block: the name's length, the size, the checksum."""
_USTAR = bytearray(_tarfile_header("", 0))
_USTAR[_CHKSUM] = b" " * 8  # as the checksum is computed
_USTAR_SUM = sum(_USTAR) - sum(_USTAR[_SIZE])
_USTAR_MAX_SIZE = 8**11 - 1  # 11 octal digits


def member_header(name: str, size: int) -> bytes:
    """The tar header of a member: the bytes of :func:`_tarfile_header`.

    Where ``tarfile`` writes a plain ustar block (an ASCII name of at most 100 bytes, a size
    that fits 11 octal digits: every sample member) the block is filled in here from a
    template, name, size and checksum alone: a tenth of ``tarfile``'s time, which was 2% of
    an ingest worker's. Anything else goes through ``tarfile``.
    """
    if not name.isascii() or len(name) > _NAME_MAX or size > _USTAR_MAX_SIZE:
        return _tarfile_header(name, size)
    raw, octal = name.encode("ascii"), b"%011o\0" % size
    block = bytearray(_USTAR)
    block[: len(raw)] = raw
    block[_SIZE] = octal
    block[_CHKSUM.start : _CHKSUM.start + 7] = b"%06o\0" % (_USTAR_SUM + sum(raw) + sum(octal))
    return bytes(block)


def _padding(size: int) -> bytes:
    """The zeros that fill a member of ``size`` bytes up to a whole tar block."""
    return tarfile.NUL * (-size % tarfile.BLOCKSIZE)


class _HashingFile(io.RawIOBase):
    """A write-only file wrapper that hashes and counts the bytes passing through."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.bytes

    def write(self, data: bytes | memoryview) -> int:  # type: ignore[override]
        self.sha256.update(data)
        self.bytes += len(data)
        return self._raw.write(data)


def drop_cached_pages(fd: int) -> None:
    """Tell the kernel that this process will not read the open file ``fd`` again: it drops
    the file's clean pages from the page cache (dirty ones stay until written back). A no-op
    where the platform or filesystem has no such advice."""
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


DIRECT_CHUNK = 4 << 20
"""Bytes per write past the page cache: a multiple of the page size, so of any device's block."""
_PAGE = mmap.PAGESIZE


class _ChunkPool:
    """Page-aligned chunks, kept for the next file once one is closed (8 MB per writer open at
    once, for the life of the process). A fresh mapping's pages are faulted in and zeroed on
    first touch: with two new chunks for each shard of 32 samples, the direct writes cost 6%
    more CPU per image than the page-cache writes they replace, measured in one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: list[mmap.mmap] = []

    def take(self) -> mmap.mmap:
        with self._lock:
            if self._free:
                return self._free.pop()
        return mmap.mmap(-1, DIRECT_CHUNK)

    def give(self, chunk: mmap.mmap) -> None:
        with self._lock:
            self._free.append(chunk)


_CHUNKS = _ChunkPool()


class _DirectFile(io.RawIOBase):
    """A new file written past the page cache (``O_DIRECT``), for files this process will not
    read again: the ingest's shards.

    Through the page cache each byte costs a copy into a fresh page, then its write-back and
    the page's drop (:class:`_Flusher`); on a VM that hands freed memory back to its host, that
    copy into long-freed pages is the largest single cost of a cold ingest. Here the bytes are
    copied into one of two page-aligned chunks, and a thread of its own writes each full chunk
    straight to the device while the caller fills the other; the caller waits for the disk only
    when it is a whole chunk ahead of it.

    The tail, less than a page, is written through the page cache. A filesystem that takes
    the flag at ``open`` but refuses such writes (``EINVAL``) gets the rest through the page
    cache too. Open with :meth:`open`, which falls back to a plain buffered file where
    ``O_DIRECT`` does not exist or is refused at ``open`` (FUSE, tmpfs before Linux 6.6).
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._direct = True
        self._chunks = [_CHUNKS.take(), _CHUNKS.take()]
        self._fill = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pneumo-shard-write")
        self._pending: Future[None] | None = None

    @classmethod
    def open(cls, path: Path) -> BinaryIO:
        """A new file at ``path`` written past the page cache where the filesystem allows it,
        else a plain buffered one."""
        direct = getattr(os, "O_DIRECT", 0)  # 0 where the platform has no such flag
        if direct:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | direct, 0o666)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
            else:
                try:
                    return cls(fd)  # type: ignore[return-value]
                except BaseException:  # no chunk to be had: leave neither descriptor nor file
                    os.close(fd)
                    path.unlink(missing_ok=True)
                    raise
        return open(path, "wb")

    def writable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._fd

    def write(self, data: bytes | memoryview) -> int:  # type: ignore[override]
        view = memoryview(data).cast("B")
        done = 0
        while done < len(view):
            take = min(DIRECT_CHUNK - self._fill, len(view) - done)
            self._chunks[0][self._fill : self._fill + take] = view[done : done + take]
            self._fill += take
            done += take
            if self._fill == DIRECT_CHUNK:
                self._send(DIRECT_CHUNK)
        return done

    def _send(self, size: int) -> None:
        """Hand the first ``size`` bytes of the chunk being filled to the write thread, once
        it has written the last one; go on filling the other chunk."""
        self._wait()
        chunk = self._chunks[0]
        self._pending = self._pool.submit(self._write_all, memoryview(chunk)[:size])
        self._chunks.reverse()
        self._fill = 0

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # raises what the write met: ENOSPC, EIO...

    def _write_all(self, view: memoryview) -> None:
        try:
            while view:
                view = view[os.write(self._fd, view) :]
        except OSError as exc:
            if exc.errno != errno.EINVAL or not self._direct:
                raise
            self._buffered()  # a filesystem that refuses O_DIRECT writes, not the flag
            self._write_all(view)

    def _buffered(self) -> None:
        """Go on through the page cache."""
        fcntl.fcntl(self._fd, fcntl.F_SETFL, fcntl.fcntl(self._fd, fcntl.F_GETFL) & ~os.O_DIRECT)
        self._direct = False

    def flush(self) -> None:
        """Write everything given so far: whole pages past the page cache, the tail through it."""
        whole = self._fill - self._fill % _PAGE
        if whole:
            tail = bytes(self._chunks[0][whole : self._fill])
            self._send(whole)
            self._chunks[0][: len(tail)] = tail
            self._fill = len(tail)
        self._wait()
        if self._fill:
            if self._direct:
                self._buffered()
            self._write_all(memoryview(self._chunks[0])[: self._fill])
            self._fill = 0

    def close(self) -> None:
        """Close the file, once no write is left in flight. What :meth:`flush` has not written
        is dropped: a writer flushes before it closes, and a failed shard is thrown away."""
        if self.closed:
            return
        try:
            self._pool.shutdown(wait=True)  # no write may still use the descriptor or a chunk
            os.close(self._fd)
            for chunk in self._chunks:
                _CHUNKS.give(chunk)
        finally:
            self._fill, self._pending, self._chunks = 0, None, []
            super().close()


class _Flusher:
    """Writes back each finished file and drops its pages, in a thread of its own.

    The ingest writes 11 GB of shards for RSNA's 26,684 files. Left to the kernel, they filled
    the page cache halfway and reclaiming it cost the workers 53 s of system time (2 cores,
    24 GiB). Dropping each shard's pages when it is closed means writing it back first, and a
    worker that does it itself waits for the disk: 39-51 of 204 core-seconds in iowait, with
    the inputs' reads queued behind those writes. Here the worker's thread goes on decoding
    while this one waits. One file at a time: a worker that finishes its next shard before the
    last one is on disk waits for it, so a disk slower than the workers holds at most two
    shards of dirty pages per worker instead of filling memory. A file written past the page
    cache (:class:`_DirectFile`) leaves it only its last page and its metadata to sync.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: threading.Thread | None = None
        self._error: OSError | None = None

    def submit(self, fd: int, path: Path) -> None:
        """Write back, drop and close ``fd`` (which this object now owns), the file now at
        ``path``; a write-back that fails removes it there (see :meth:`wait`)."""
        with self._lock:
            self._join()
            self._pending = threading.Thread(target=self._flush, args=(fd, path), name="pneumo-shard-flush", daemon=True)
            self._pending.start()

    def wait(self) -> None:
        """Wait for the file in flight; raise the error of a write-back that failed since the
        last call (ENOSPC, EDQUOT or EIO: its file was removed)."""
        with self._lock:
            self._join()
            if self._error is not None:
                error, self._error = self._error, None
                raise error

    def _join(self) -> None:
        if self._pending is not None:
            self._pending.join()
            self._pending = None

    def _flush(self, fd: int, path: Path) -> None:
        # Not durable by contract (the driver syncs, a reuse re-hashes), but a write-back error
        # means bytes that never reached the disk: the file goes, and the writer hears of it.
        try:
            inode = os.fstat(fd).st_ino
            try:
                os.fdatasync(fd)
                drop_cached_pages(fd)
            finally:
                os.close(fd)  # NFS reports a quota met at write-back here
        except OSError as exc:
            with contextlib.suppress(OSError):
                if path.stat().st_ino == inode:  # not a file written since under that name
                    path.unlink()
            if exc.filename is None:
                exc.filename = str(path)
            self._error = self._error or exc


_FLUSHER = _Flusher()
"""The one flusher of this process (see :class:`ShardWriter`'s ``durable``)."""


def wait_flushed() -> None:
    """Wait until this process's shards written with ``durable=False`` are on disk; raise the
    error of one whose write-back failed (its file is gone). The ingest's driver calls it on
    every worker before it trusts their shards."""
    _FLUSHER.wait()


class ShardWriter:
    """Write one tar shard under a temporary name and rename it into place on success.

    Headers are fixed (mtime 0, uid/gid 0, no user names, mode 0644) and members are
    written in call order, so the same samples give byte-identical files. Use as a context
    manager; on an exception the temporary file is removed and nothing appears at ``path``.
    On success :attr:`result` is the shard as the manifest records it, under ``split``.
    The bytes go past the page cache where the filesystem allows it (:class:`_DirectFile`).
    ``durable=False`` skips the fsync before the rename: the file is written back and dropped
    from the page cache later, by a thread of its own (:class:`_Flusher`). For a writer whose
    files are checked against their sha256 before any reuse and synced later (the ingest:
    ``run_ingest``).

    Example:
        >>> with ShardWriter(out / "train-000000.tar") as w:
        ...     w.write(key, image, meta)
        >>> w.result.sha256
    """

    def __init__(self, path: Path | str, *, split: str = "", durable: bool = True) -> None:
        self.path = Path(path)
        self.split = split
        self.durable = durable
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:12]}")
        self._keys: set[str] = set()
        self._first: str | None = None
        self._last: str | None = None
        self._file: BinaryIO | None = None
        self._hasher: _HashingFile | None = None
        self._digests: list[tuple[str, str]] = []
        self.result: ShardInfo | None = None

    def __enter__(self) -> "ShardWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = _DirectFile.open(self._tmp)
        self._hasher = _HashingFile(self._file)
        return self

    def write(self, key: str, image: np.ndarray, meta: dict[str, Any]) -> None:
        """Append one sample: ``<key>.npy`` then ``<key>.json``, each a tar member (header,
        bytes, padding: those of ``tarfile`` in PAX format, which the tests compare against).

        Three writes: the pixels as they are (no copy), and the small pieces before and after
        them joined (one write per piece was 2% of an ingest worker's time in Python calls).
        """
        assert self._hasher is not None, "ShardWriter used outside its with-block"
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in {self.path.name}")
        if meta.get("key") != key:
            raise ValueError(f"meta key {meta.get('key')!r} differs from sample key {key!r}")
        self._keys.add(key)
        npy_header, pixels = image_parts(image)
        npy_size, js = len(npy_header) + len(pixels), encode_meta(meta)
        self._hasher.write(member_header(f"{key}.{IMAGE_EXT}", npy_size) + npy_header)
        self._hasher.write(pixels)
        self._hasher.write(b"".join((_padding(npy_size), member_header(f"{key}.{META_EXT}", len(js)), js, _padding(len(js)))))
        self._digests.append((digest_of(npy_header, pixels), digest_of(js)))
        self._first = self._first or key
        self._last = key

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._file is not None and self._hasher is not None
        written = False
        flush_fd: int | None = None
        try:
            if exc_type is None:
                # The end-of-archive marker, then zeros up to a whole record, as tarfile writes.
                self._hasher.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
                if pad := -self._hasher.bytes % tarfile.RECORDSIZE:
                    self._hasher.write(tarfile.NUL * pad)
                self._file.flush()
                if self.durable:
                    os.fsync(self._file.fileno())
                else:
                    _FLUSHER.wait()  # the shard before this one: a write-back error stops this one too
                    flush_fd = os.dup(self._file.fileno())
                written = True
        finally:
            try:
                self._file.close()  # an error here (EDQUOT written back) fails the shard
            except BaseException:
                written = False
                raise
            finally:
                if not written:  # an error in the with-block, or in finishing the file
                    self._tmp.unlink(missing_ok=True)
                    if flush_fd is not None:
                        os.close(flush_fd)
        if not written:
            return
        try:
            os.replace(self._tmp, self.path)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            if flush_fd is not None:
                os.close(flush_fd)
            raise
        if flush_fd is not None:
            _FLUSHER.submit(flush_fd, self.path)
        self.result = ShardInfo(
            name=self.path.name,
            split=self.split,
            samples=len(self._keys),
            bytes=self._hasher.bytes,
            sha256=self._hasher.sha256.hexdigest(),
            first_key=self._first,
            last_key=self._last,
            xxh3=tuple(self._digests),
        )
