"""Deterministic webdataset tar shard writer."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import os
import tarfile
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
    the file's clean pages from the page cache, and starts writing back the dirty ones so that
    they can be dropped soon.

    The ingest writes 11 GB of shards for RSNA's 26,684 files: without this the page cache
    filled up halfway and reclaiming it cost the workers 53 s of system time (2 cores, 24 GiB;
    12 s with it, ``python -m ingest`` on the full synthetic set). A no-op where the platform
    or filesystem has no such advice.
    """
    with contextlib.suppress(AttributeError, OSError):
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)


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
    ``durable=False`` skips the fsync before the rename: for a writer whose files are checked
    against their sha256 before any reuse and synced later (the ingest: ``run_ingest``).

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
        info = tarfile.TarInfo(name)
        info.size = sum(len(p) for p in parts)
        info.mtime = TAR_MTIME
        info.mode = TAR_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        self._hasher.write(info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "strict"))
        for part in parts:
            self._hasher.write(part)
        if pad := -info.size % tarfile.BLOCKSIZE:
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
            else:
                drop_cached_pages(self._file.fileno())
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
