"""Deterministic webdataset tar shard writer."""

from __future__ import annotations

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
    encode_image,
    encode_meta,
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

    def write(self, data: bytes) -> int:  # type: ignore[override]
        self.sha256.update(data)
        self.bytes += len(data)
        return self._raw.write(data)


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

    Example:
        >>> with ShardWriter(out / "train-000000.tar") as w:
        ...     w.write(key, image, meta)
        >>> w.result.sha256
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp-{uuid.uuid4().hex[:12]}")
        self._keys: set[str] = set()
        self._first: str | None = None
        self._last: str | None = None
        self._file: BinaryIO | None = None
        self._hasher: _HashingFile | None = None
        self._tar: tarfile.TarFile | None = None
        self.result: WrittenShard | None = None

    def __enter__(self) -> "ShardWriter":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self._tmp, "wb")
        self._hasher = _HashingFile(self._file)
        # Plain "w" mode: the stream mode "w|" re-slices its 10 KB record buffer for every
        # block of a member, copying each 410 KB image dozens of times.
        self._tar = tarfile.open(fileobj=self._hasher, mode="w", format=tarfile.PAX_FORMAT)
        self._tar.copybufsize = 1 << 20  # one write per member instead of one per 16 KB
        return self

    def _add(self, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        info.mtime = TAR_MTIME
        info.mode = TAR_MODE
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        assert self._tar is not None, "ShardWriter used outside its with-block"
        self._tar.addfile(info, io.BytesIO(data))

    def write(self, key: str, image: np.ndarray, meta: dict[str, Any]) -> None:
        """Append one sample: ``<key>.npy`` then ``<key>.json``."""
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in {self.path.name}")
        if meta.get("key") != key:
            raise ValueError(f"meta key {meta.get('key')!r} differs from sample key {key!r}")
        self._keys.add(key)
        self._add(f"{key}.{IMAGE_EXT}", encode_image(image))
        self._add(f"{key}.{META_EXT}", encode_meta(meta))
        self._first = self._first or key
        self._last = key

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tar is not None and self._file is not None and self._hasher is not None
        try:
            self._tar.close()
            self._file.flush()
            os.fsync(self._file.fileno())
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
