"""Deterministic webdataset tar shard writer."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import tarfile
import threading
import uuid
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from shards.format import (
    IMAGE_EXT,
    META_EXT,
    TAR_MODE,
    TAR_MTIME,
    check_key,
    encode_meta,
    image_parts,
)


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


class _Flusher:
    """Writes back each finished file and drops its pages, in a thread of its own.

    The ingest writes 11 GB of shards for RSNA's 26,684 files. Left to the kernel, they filled
    the page cache halfway and reclaiming it cost the workers 53 s of system time (2 cores,
    24 GiB). Dropping each shard's pages when it is closed means writing it back first, and a
    worker that does it itself waits for the disk: 39-51 of 204 core-seconds in iowait, with
    the inputs' reads queued behind those writes. Here the worker's thread goes on decoding
    while this one waits. One file at a time: a worker that finishes its next shard before the
    last one is on disk waits for it, so a disk slower than the workers holds at most two
    shards of dirty pages per worker instead of filling memory.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: threading.Thread | None = None

    def submit(self, fd: int) -> None:
        """Write back, drop and close ``fd`` (which this object now owns)."""
        with self._lock:
            if self._pending is not None:
                self._pending.join()
            self._pending = threading.Thread(target=self._flush, args=(fd,), name="pneumo-shard-flush", daemon=True)
            self._pending.start()

    @staticmethod
    def _flush(fd: int) -> None:
        try:
            os.fdatasync(fd)
            drop_cached_pages(fd)
        except OSError:
            pass  # not durable by contract: the driver syncs, and a reuse re-hashes (ingest.worker)
        finally:
            os.close(fd)


_FLUSHER = _Flusher()
"""The one flusher of this process (see :class:`ShardWriter`'s ``durable``)."""


@dataclasses.dataclass(frozen=True)
class WrittenShard:
    """What a finished :class:`ShardWriter` produced."""

    path: Path
    samples: int
    bytes: int
    sha256: str
    first_key: str | None
    last_key: str | None


class ShardWriter:
    """Write one tar shard under a temporary name and rename it into place on success.

    Headers are fixed (mtime 0, uid/gid 0, no user names, mode 0644) and members are
    written in call order, so the same samples give byte-identical files. Use as a context
    manager; on an exception the temporary file is removed and nothing appears at ``path``.
    ``durable=False`` skips the fsync before the rename: the file is written back and dropped
    from the page cache later, by a thread of its own (:class:`_Flusher`). For a writer whose
    files are checked against their sha256 before any reuse and synced later (the ingest:
    ``run_ingest``).

    Example:
        >>> with ShardWriter(out / "train-000000.tar") as w:
        ...     w.write(key, image, meta)
        >>> w.result.sha256
    """

    def __init__(self, path: Path | str, *, durable: bool = True) -> None:
        self.path = Path(path)
        self.durable = durable
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:12]}")
        self._keys: set[str] = set()
        self._first: str | None = None
        self._last: str | None = None
        self._file: BinaryIO | None = None
        self._hasher: _HashingFile | None = None
        self.result: WrittenShard | None = None

    def __enter__(self) -> "ShardWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "wb")
        self._hasher = _HashingFile(self._file)
        return self

    def _add(self, name: str, *parts: bytes | memoryview) -> None:
        """Append one member: its header, ``parts`` as they are (no copy), its padding. The
        bytes are those of ``tarfile`` in PAX format, which the tests compare against."""
        assert self._hasher is not None, "ShardWriter used outside its with-block"
        size = sum(len(p) for p in parts)
        self._hasher.write(member_header(name, size))
        for part in parts:
            self._hasher.write(part)
        if pad := -size % tarfile.BLOCKSIZE:
            self._hasher.write(tarfile.NUL * pad)

    def write(self, key: str, image: np.ndarray, meta: dict[str, Any]) -> None:
        """Append one sample: ``<key>.npy`` then ``<key>.json``."""
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in {self.path.name}")
        if meta.get("key") != key:
            raise ValueError(f"meta key {meta.get('key')!r} differs from sample key {key!r}")
        self._keys.add(key)
        self._add(f"{key}.{IMAGE_EXT}", *image_parts(image))
        self._add(f"{key}.{META_EXT}", encode_meta(meta))
        self._first = self._first or key
        self._last = key

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._file is not None and self._hasher is not None
        try:
            # The end-of-archive marker, then zeros up to a whole record, as tarfile writes.
            self._hasher.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
            if pad := -self._hasher.bytes % tarfile.RECORDSIZE:
                self._hasher.write(tarfile.NUL * pad)
            self._file.flush()
            if self.durable:
                os.fsync(self._file.fileno())
            elif exc_type is None:
                _FLUSHER.submit(os.dup(self._file.fileno()))
        finally:
            self._file.close()
        if exc_type is not None:
            self._tmp.unlink(missing_ok=True)
            return
        os.replace(self._tmp, self.path)
        self.result = WrittenShard(
            path=self.path,
            samples=len(self._keys),
            bytes=self._hasher.bytes,
            sha256=self._hasher.sha256.hexdigest(),
            first_key=self._first,
            last_key=self._last,
        )
