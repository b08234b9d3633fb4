"""Streaming shard reader: pairs members per key, never unpickles, checks the shard hash."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

import numpy as np

from shards.format import IMAGE_EXT, META_EXT, FormatError, decode_image, decode_meta, split_member

READ_CHUNK = 1 << 20


class ShardChecksumError(RuntimeError):
    """A shard's bytes do not hash to the sha256 the manifest recorded."""

    def __init__(self, shard: str, expected: str, actual: str) -> None:
        super().__init__(
            f"shard {shard}: sha256 {actual[:16]}... does not match manifest {expected[:16]}..."
            " (the file is corrupt or was changed after the ingest; run `python -m shards verify`)"
        )
        self.shard, self.expected, self.actual = shard, expected, actual


@dataclasses.dataclass
class Sample:
    """One decoded sample."""

    key: str
    image: np.ndarray
    meta: dict[str, Any]


class HashingReader(io.RawIOBase):
    """A read-only file wrapper that hashes every byte read through it."""

    def __init__(self, raw: BinaryIO) -> None:
        self._raw = raw
        self.sha256 = hashlib.sha256()
        self.bytes = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:  # type: ignore[override]
        n = self._raw.readinto(buf)
        if n:
            view = memoryview(buf)[:n]
            self.sha256.update(view)
            self.bytes += n
        return n or 0

    def drain(self) -> None:
        """Read (and hash) whatever is left, e.g. the tar end-of-archive padding."""
        while chunk := self._raw.read(READ_CHUNK):
            self.sha256.update(chunk)
            self.bytes += len(chunk)


def check_member_name(name: str) -> None:
    """Raise :class:`FormatError` for a name that could escape an extraction directory."""
    p = PurePosixPath(name)
    if p.is_absolute() or ".." in p.parts or "/" in name or "\\" in name:
        raise FormatError(f"unsafe member name {name!r}")


def iter_members(stream: BinaryIO, shard: str) -> Iterator[tuple[str, str, bytes]]:
    """Yield (key, extension, data) for each regular member of a tar stream."""
    try:
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for info in tar:
                if not info.isfile():
                    raise FormatError(f"{shard}: member {info.name!r} is not a regular file")
                check_member_name(info.name)
                key, ext = split_member(info.name)
                f = tar.extractfile(info)
                assert f is not None
                yield key, ext, f.read()
    except tarfile.TarError as exc:
        raise FormatError(f"{shard}: damaged tar ({exc})") from exc


def iter_samples(
    path: Path | str,
    *,
    expected_sha256: str | None = None,
    size: int | None = None,
    decode: bool = True,
) -> Iterator[Sample]:
    """Stream the samples of one shard in file order.

    Members of one key must be adjacent and complete (``.npy`` and ``.json``). The whole file
    is hashed as it is read; with ``expected_sha256`` a mismatch raises
    :class:`ShardChecksumError` naming the shard once the last byte has been read.

    Args:
        path: the shard file.
        expected_sha256: hex digest from the manifest, or None to skip the check.
        size: expected image side, or None to accept any square/rectangle.
        decode: parse the ``.npy`` (True) or leave ``image`` as an empty array.
    """
    path = Path(path)
    name = path.name
    with open(path, "rb", buffering=0) as raw:
        hashing = HashingReader(raw)
        stream = io.BufferedReader(hashing, buffer_size=READ_CHUNK)
        pending: dict[str, bytes] = {}
        pending_key: str | None = None
        for key, ext, data in iter_members(stream, name):
            if pending_key is not None and key != pending_key:
                raise FormatError(f"{name}: sample {pending_key!r} is missing {_missing(pending)}")
            if ext not in (IMAGE_EXT, META_EXT):
                raise FormatError(f"{name}: unexpected member {key}.{ext}")
            if ext in pending:
                raise FormatError(f"{name}: duplicate member {key}.{ext}")
            pending_key = key
            pending[ext] = data
            if len(pending) == 2:
                meta = decode_meta(pending[META_EXT])
                image = (
                    decode_image(pending[IMAGE_EXT], size)
                    if decode
                    else np.empty((0, 0), np.uint8)
                )
                if meta.get("key") != key:
                    raise FormatError(f"{name}: {key}.json names key {meta.get('key')!r}")
                yield Sample(key, image, meta)
                pending, pending_key = {}, None
        if pending_key is not None:
            raise FormatError(f"{name}: sample {pending_key!r} is missing {_missing(pending)}")
        stream.read()  # let the buffered reader hand through what it already holds
        hashing.drain()
    if expected_sha256 is not None and hashing.sha256.hexdigest() != expected_sha256:
        raise ShardChecksumError(name, expected_sha256, hashing.sha256.hexdigest())


def _missing(pending: dict[str, bytes]) -> str:
    return " and ".join(f".{e}" for e in (IMAGE_EXT, META_EXT) if e not in pending)
