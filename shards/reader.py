"""Streaming shard reader: pairs members per key, never unpickles, checks the shard hash.

The tar structure is parsed by :class:`shards.tar.TarParser` in one sequential pass over the
file: each member is read once into its own buffer and hashed as it arrives (the SHA-256 of
the whole file, on a helper thread), and the image is a read-only view of that buffer (no
copy).
"""

from __future__ import annotations

import dataclasses
import hashlib
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from shards.format import IMAGE_EXT, MEMBER_EXTS, META_EXT, FormatError, check_member_name, decode_image, decode_meta, split_member
from shards.manifest import READ_CHUNK
from shards.tar import ByteSource, TarParser



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


class _ThreadedSha256:
    """SHA-256 of the buffers given to :meth:`update`, in order, on one helper thread.

    hashlib releases the GIL while it hashes, so the thread hashes one member while the
    caller parses and uses the next: about 1.3x the samples/s of hashing inline when a core
    is free (measured on the loader bench). Buffers must not change after ``update``.
    """

    _QUEUE = 32
    """Buffers waiting to be hashed before ``update`` blocks (about 13 MB of images)."""

    def __init__(self) -> None:
        self._sha256 = hashlib.sha256()
        self._queue: queue.Queue[bytes | bytearray | memoryview | None] = queue.Queue(self._QUEUE)
        self._thread = threading.Thread(target=self._run, name="shard-sha256", daemon=True)
        self._thread.start()
        self._digest: str | None = None

    def _run(self) -> None:
        while (data := self._queue.get()) is not None:
            self._sha256.update(data)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._queue.put(data)

    def hexdigest(self) -> str:
        """Wait for the thread to finish and return the digest (closes the hasher)."""
        if self._digest is None:
            self._queue.put(None)
            self._thread.join()
            self._digest = self._sha256.hexdigest()
        return self._digest

    close = hexdigest


class _OwnBuffers:
    """A :class:`shards.tar.ByteSource` that reads each request into a buffer of its own (so an
    image can stay a view of it) and hands every buffer to the hasher as it arrives."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.sha256 = _ThreadedSha256()
        self.offset = 0

    def read(self, n: int) -> bytearray:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n and (k := self._f.readinto(view[got:])):
            got += k
        self.offset += got
        if got < n:
            buf = buf[:got]  # the end of the file: the parser reports where
        self.sha256.update(buf)
        return buf

    def skip(self, n: int) -> int:
        return len(self.read(n))

    def drain(self) -> None:
        """Read (and hash) whatever follows the end-of-archive marker."""
        while chunk := self._f.read(READ_CHUNK):
            self.offset += len(chunk)
            self.sha256.update(chunk)


@dataclasses.dataclass(frozen=True)
class VerifiedShard:
    """A shard's whole content in memory, already hashed and found equal to :attr:`sha256`.

    Made only by code that has just hashed these very bytes against the manifest
    (:class:`shards.cache.ShardCache`); :func:`iter_samples` parses it without hashing it again,
    so a cached or downloaded shard is hashed once per read. ``data`` is a read-only view of a
    buffer nobody else holds: the bytes parsed are exactly the bytes hashed.
    """

    name: str
    sha256: str
    data: memoryview


class _VerifiedBytes:
    """A :class:`shards.tar.ByteSource` over a :class:`VerifiedShard` (views, no copy, no hash)."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self.offset = 0

    def read(self, n: int) -> memoryview:
        out = self._data[self.offset:self.offset + n]
        self.offset += len(out)
        return out

    def skip(self, n: int) -> int:
        return len(self.read(n))


def iter_samples(
    path: Path | str | VerifiedShard,
    *,
    expected_sha256: str | None = None,
    size: int | None = None,
    decode: bool = True,
) -> Iterator[Sample]:
    """Stream the samples of one shard in file order.

    Members of one key must be adjacent and complete (``.npy`` and ``.json``). The whole file
    is hashed as it is read; with ``expected_sha256`` a mismatch raises
    :class:`ShardChecksumError` naming the shard once the last byte has been read. Images are
    views of the buffers read (no copy) and never unpickled. A :class:`VerifiedShard` was
    hashed before any of it is parsed: only its recorded digest is compared (at once).

    Args:
        path: the shard file, or its content already verified.
        expected_sha256: hex digest from the manifest, or None to skip the check.
        size: expected image side, or None to accept any 2-D uint8 image.
        decode: parse the ``.npy`` (True) or leave ``image`` as an empty array.
    """
    if isinstance(path, VerifiedShard):
        if expected_sha256 is not None and path.sha256 != expected_sha256:
            raise ShardChecksumError(path.name, expected_sha256, path.sha256)
        yield from _parse(_VerifiedBytes(path.data), path.name, size, decode)
        return
    path = Path(path)
    name = path.name
    with open(path, "rb", buffering=READ_CHUNK) as f:
        stream = _OwnBuffers(f)
        try:
            yield from _parse(stream, name, size, decode)
            stream.drain()
        finally:
            stream.sha256.close()  # also when the caller stops early: no thread left behind
    actual = stream.sha256.hexdigest()
    if expected_sha256 is not None and actual != expected_sha256:
        raise ShardChecksumError(name, expected_sha256, actual)


def _parse(stream: ByteSource, name: str, size: int | None, decode: bool) -> Iterator[Sample]:
    """The samples of the tar read from ``stream`` (which hashes, or was verified)."""
    pending: dict[str, Any] = {}
    pending_key: str | None = None
    for key, ext, data in _sample_members(TarParser(stream, name), name):
        if pending_key is not None and key != pending_key:
            raise FormatError(f"{name}: sample {pending_key!r} is missing {_missing(pending)}")
        if ext not in MEMBER_EXTS:
            raise FormatError(f"{name}: unexpected member {key}.{ext}")
        if ext in pending:
            raise FormatError(f"{name}: duplicate member {key}.{ext}")
        pending_key = key
        pending[ext] = data
        if len(pending) == 2:
            meta = decode_meta(bytes(pending[META_EXT]))
            if meta.get("key") != key:
                raise FormatError(f"{name}: {key}.json names key {meta.get('key')!r}")
            image = decode_image(pending[IMAGE_EXT], size) if decode else np.empty((0, 0), np.uint8)
            image.flags.writeable = False  # its bytes may still be waiting to be hashed
            yield Sample(key, image, meta)
            pending, pending_key = {}, None
    if pending_key is not None:
        raise FormatError(f"{name}: sample {pending_key!r} is missing {_missing(pending)}")


def _sample_members(parser: TarParser, shard: str) -> Iterator[tuple[str, str, bytearray | memoryview]]:
    """(key, extension, data) of each member; anything but a regular file of a safe name raises."""
    for member in parser.members():
        if not member.is_file:
            raise FormatError(f"{shard}: member {member.name!r} is not a regular file")
        check_member_name(member.name)
        key, ext = split_member(member.name)
        yield key, ext, parser.read_data(member)


def _missing(pending: dict[str, Any]) -> str:
    return " and ".join(f".{e}" for e in MEMBER_EXTS if e not in pending)
