"""Shard readers: pair members per key, never unpickle, check what they read.

Two readers share :class:`shards.tar.TarParser`:

* :func:`iter_samples` streams a whole shard in one sequential pass: each member is read
  once into its own buffer and hashed as it arrives (the SHA-256 of the whole file, on a
  helper thread), and the image is a read-only view of that buffer (no copy). For the tools
  (show, tests) and anything that wants a shard's samples in file order.
* :func:`read_into` reads a range of samples, each image straight into a buffer the caller
  gives (the loader's batch rows), and checks each sample against its per-sample xxh3
  digests (:mod:`shards.checksum`) before yielding it; a format 1 shard is hashed whole.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import queue
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import xxhash

from shards.checksum import digest_of
from shards.format import (
    IMAGE_EXT,
    MEMBER_EXTS,
    META_EXT,
    NPY_HEADER_MAX,
    FormatError,
    check_member_name,
    decode_image,
    decode_meta,
    npy_header,
    npy_header_bytes,
    split_member,
)
from shards.manifest import READ_CHUNK, ShardInfo
from shards.tar import BLOCK, ByteSource, TarMember, TarParser, padded
from shards.writer import _USTAR, _USTAR_SUM, member_header

try:
    from shards import _fastread
except ImportError:  # installed without a C compiler: _plain_run reads the same, slower
    _fastread = None  # type: ignore[assignment]

_USTAR_BYTES = bytes(_USTAR)

class ShardChecksumError(RuntimeError):
    """A shard's bytes do not hash to the sha256 the manifest recorded."""

    def __init__(self, shard: str, expected: str, actual: str) -> None:
        super().__init__(
            f"shard {shard}: sha256 {actual[:16]}... does not match manifest {expected[:16]}..."
            " (the file is corrupt or was changed after the ingest; run `python -m shards verify`)"
        )
        self.shard, self.expected, self.actual = shard, expected, actual


class SampleChecksumError(ShardChecksumError):
    """One member of one sample does not hash to the xxh3-128 the manifest recorded for it."""

    def __init__(self, shard: str, index: int, key: str, member: str, expected: str, actual: str) -> None:
        RuntimeError.__init__(
            self,
            f"shard {shard}: sample {index} ({key}.{member}): xxh3 {actual[:16]}... does not match "
            f"manifest {expected[:16]}... (the shard is corrupt or was changed after the ingest; "
            "run `python -m shards verify --deep`)",
        )
        self.shard, self.expected, self.actual = shard, expected, actual
        self.index, self.key, self.member = index, key, member


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


# --------------------------------------------------------------------------- into buffers


@dataclasses.dataclass(frozen=True, slots=True)
class SampleMeta:
    """A sample read by :func:`read_into`: its pixels are in the buffer its slot gave."""

    index: int
    """Position of the sample in the shard (file order)."""
    key: str
    meta: dict[str, Any]


Slot = Callable[[int], "np.ndarray | None"]
"""Where :func:`read_into` puts the pixels of the sample at a file position: a writable
C-contiguous uint8 (size, size) array, or None for a sample in range the caller does not keep."""


def read_into(
    where: Path | str | VerifiedShard,
    shard: ShardInfo,
    *,
    size: int,
    slot: Slot,
    start: int = 0,
    stop: int | None = None,
    name: str | None = None,
) -> Iterator[SampleMeta]:
    """Read samples ``[start, stop)`` of one shard, each image straight into its buffer.

    The ``.npy`` payload of each sample is read from the file into ``slot(index)`` with no
    copy in between (one ``preadv`` per image). With per-sample checksums in the manifest
    (format 2, ``shard.xxh3``) each member a sample is built from is hashed as soon as it is
    read and a sample is yielded only once both match: nothing of a damaged sample reaches
    the caller, and samples outside the range are passed over unread. A shard of a format 1
    dataset is read whole and hashed (sha256) in file order, with the mismatch raised after
    its last byte, as :func:`iter_samples` does. A :class:`VerifiedShard` was hashed whole
    already; its per-sample checksums are checked all the same.

    Args:
        where: The shard file, or its content already verified.
        shard: The manifest's record of it (size, sha256, per-sample checksums).
        size: Side of the stored images.
        slot: The buffer for each sample's pixels (see :data:`Slot`).
        start, stop: File positions of the samples wanted (``stop`` None: to the end, with
            the sample count checked against the manifest).
        name: How errors name the shard (its URL); default ``shard.name``.

    Raises:
        SampleChecksumError: A member's bytes differ from the manifest's digest.
        ShardChecksumError: A format 1 shard's sha256 differs (after its last sample).
        FormatError: The file's size or samples differ from the manifest, or a member is
            malformed (a damaged tar header is a :class:`shards.tar.TarHeaderError`).
    """
    name = name or shard.name
    digests = shard.xxh3
    stop = shard.samples if stop is None else min(stop, shard.samples)
    to_end = stop == shard.samples or digests is None  # format 1: every byte hashed, every sample counted
    f: BinaryIO | None = None
    if isinstance(where, VerifiedShard):
        if where.sha256 != shard.sha256:
            raise ShardChecksumError(name, shard.sha256, where.sha256)
        src: _SlotSource = _MemorySlots(where.data)
    else:
        f = open(where, "rb", buffering=0)
        src = _FileSlots(f.fileno()) if digests is not None else _HashedFileSlots(f.fileno())
    try:
        if src.size != shard.bytes:
            raise FormatError(f"{name}: {src.size} bytes, the manifest records {shard.bytes} "
                              "(the shard is truncated or was replaced; run `python -m shards verify`)")
        if type(src) is _FileSlots:
            yield from _read_plain(src, name, shard, size, slot, start, stop, to_end)
        else:
            yield from _read_slots(TarParser(src, name), name, shard, size, slot, start, stop, to_end)
        if isinstance(src, _HashedFileSlots):
            src.drain()
            actual = src.sha256.hexdigest()
            if actual != shard.sha256:
                raise ShardChecksumError(name, shard.sha256, actual)
    finally:
        if f is not None:
            f.close()


_TRAILER = 4096
"""Bytes a plain read takes after an image: the JSON member's header and data and the next
sample's header, in one ``pread`` when the JSON is under 3 KiB (it is about 600 bytes)."""

RUN = 8
"""Samples :func:`_read_plain` asks of one read run: the compiled loop reads them with the
GIL released throughout, so that reader threads overlap for the whole run."""

PlainRun = Callable[..., "tuple[int, list[tuple[int, str, bytes | None]]]"]
"""``(fd, at, dests, digests, head, pixels, template, ustar_sum) -> (at, [(offset, key,
json), ...])``: :func:`shards._fastread.read_run`, or :func:`_plain_run` without it."""


def _read_plain(src: _FileSlots, name: str, shard: ShardInfo, size: int, slot: Slot,
                start: int, stop: int, to_end: bool, run: PlainRun | None = None) -> Iterator[SampleMeta]:
    """:func:`_read_slots` for a local file of a dataset with per-sample checksums, in fewer
    steps and system calls per sample: two reads (the image with its headers; the JSON with
    the headers around it), no member objects, and :data:`RUN` samples at a time in the
    compiled loop (:mod:`shards._fastread`; :func:`_plain_run` reads the same in Python
    where the extension was not built).

    It accepts only what the writer writes: each header must be the one
    :func:`shards.writer.member_header` makes for its name and size (so every field is
    checked, not only the tar checksum), each ``.npy`` header the one of a C-ordered uint8
    ``(size, size)`` array, and every digest must match. At the first sample where anything
    differs (a damaged or foreign header, a checksum, a short file, the end of the archive
    before ``stop``) it hands over to :func:`_read_slots` from that sample's first header,
    which accepts any valid tar and raises the precise error: the samples yielded and the
    errors raised are those of :func:`_read_slots` alone.
    """
    digests = shard.xxh3
    assert digests is not None
    run = run or (_plain_run if _fastread is None else _fastread.read_run)
    fd = src._fd
    head, pixels = npy_header_bytes((size, size)), size * size
    npy_size = len(head) + pixels
    index, at = 0, 0
    while index < stop:
        k = min(RUN, stop - index)
        dests: list[np.ndarray | None] = []
        pairs: list[tuple[str, str] | None] = []
        for i in range(index, index + k):
            wanted = i >= start
            dests.append(slot(i) if wanted else None)
            pairs.append(digests[i] if wanted else None)
        at, got = run(fd, at, dests, pairs, head, pixels, _USTAR_BYTES, _USTAR_SUM)
        for offset, key, js in got:
            if js is not None:
                meta = decode_meta(js)
                if meta.get("key") != key:
                    at = offset  # the general reader raises on this sample
                    break
                yield SampleMeta(index, key, meta)
            index += 1
        else:
            if len(got) == k:
                continue
        break  # sample ``index`` differs from what the writer writes
    else:  # the range is read: a range that ends before the shard does ends at a sample,
        # anything else after it is for the general reader to judge
        if not to_end and index < shard.samples and _image_key(os.pread(fd, BLOCK, at), npy_size) is not None:
            return
    src.offset = at
    yield from _read_slots(TarParser(src, name), name, shard, size, slot, start, stop, to_end, index)


def _image_key(block: bytes, npy_size: int) -> str | None:
    """The key of a sample's first header exactly as the writer makes it (its ``.npy``
    member, ``npy_size`` bytes), else None."""
    member = _plain_header(block)
    if member is None or member[1] != npy_size or not member[0].endswith(f".{IMAGE_EXT}"):
        return None
    key = member[0][: -len(IMAGE_EXT) - 1]
    return None if "." in key else key


def _plain_run(fd: int, at: int, dests: list[np.ndarray | None], digests: list[tuple[str, str] | None],
               head: bytes, pixels: int, template: bytes, ustar_sum: int) -> tuple[int, list[tuple[int, str, bytes | None]]]:
    """:func:`shards._fastread.read_run` in Python: the same samples read, the same returned."""
    del template, ustar_sum  # the headers are compared with member_header's own
    npy_size = len(head) + pixels
    npy_end = BLOCK + padded(npy_size)  # from a sample's first header to its JSON's header
    after_head = xxhash.xxh3_128(head)
    got_head = bytearray(len(head))
    file_size = os.fstat(fd).st_size
    out: list[tuple[int, str, bytes | None]] = []
    for dest, expected in zip(dests, digests):
        key = _image_key(os.pread(fd, BLOCK, at), npy_size)
        if key is None:
            break
        pixels_view = None if dest is None else memoryview(dest).cast("B")
        if pixels_view is not None:
            if os.preadv(fd, [got_head, pixels_view], at + BLOCK) != npy_size or got_head != head:
                break
        trailer = os.pread(fd, _TRAILER, at + npy_end)
        member = _plain_header(trailer[:BLOCK])
        if member is None or member[0] != f"{key}.{META_EXT}":
            break
        js_size, next_block = member[1], BLOCK + padded(member[1])
        if at + npy_end + next_block > file_size:  # a JSON larger than what is left of the file
            break
        if next_block <= len(trailer):
            js = trailer[BLOCK : BLOCK + js_size]
        else:
            js = os.pread(fd, next_block - BLOCK, at + npy_end + BLOCK)
            if len(js) < next_block - BLOCK:  # the file ends inside the JSON or its padding
                break
            js = js[:js_size]
        if expected is not None:
            if pixels_view is not None:
                h = after_head.copy()
                h.update(pixels_view)
                if h.hexdigest() != expected[0]:
                    break
            if xxhash.xxh3_128_hexdigest(js) != expected[1]:
                break
        out.append((at, key, js if expected is not None else None))
        at += npy_end + next_block
    return at, out


def _plain_header(block: bytes) -> tuple[str, int] | None:
    """(name, size) of a header block exactly as the writer makes it, else None."""
    if len(block) < BLOCK or block[156:157] != b"0":
        return None
    try:
        name = block[:100].split(b"\0", 1)[0].decode("ascii")
        size = int(block[124:135], 8)
    except (UnicodeDecodeError, ValueError):
        return None
    return (name, size) if member_header(name, size) == block else None


def _read_slots(parser: TarParser, name: str, shard: ShardInfo, size: int, slot: Slot,
                start: int, stop: int, to_end: bool, index: int = 0) -> Iterator[SampleMeta]:
    """The samples of ``[start, stop)`` of the tar ``parser`` walks (see :func:`read_into`),
    the first member being sample ``index``'s.

    Data nobody keeps is left to the parser, which passes over it (a format 1 source still
    reads and hashes it)."""
    digests = shard.xxh3
    pixels = size * size
    key = None
    npy: bytes | None = None
    js: bytes | None = None
    dest: np.ndarray | None = None
    members = parser.members()
    try:
        for member in members:
            if not member.is_file:
                raise FormatError(f"{name}: member {member.name!r} is not a regular file")
            check_member_name(member.name)
            mkey, ext = split_member(member.name)
            if key is not None and mkey != key:
                raise FormatError(f"{name}: sample {key!r} is missing {_missing_of(npy, js)}")
            if ext not in MEMBER_EXTS:
                raise FormatError(f"{name}: unexpected member {member.name}")
            if (npy if ext == IMAGE_EXT else js) is not None:
                raise FormatError(f"{name}: duplicate member {member.name}")
            if index >= shard.samples:
                raise FormatError(f"{name}: holds {index + 1}+ samples, the manifest says {shard.samples}")
            if index >= stop and not to_end:
                return
            key, wanted = mkey, start <= index < stop
            if ext == IMAGE_EXT:
                dest = slot(index) if wanted else None
                npy = b"" if dest is None else _read_npy(parser, member, dest, size, pixels, name)
            else:
                js = bytes(parser.read_data(member)) if wanted else b""
            if npy is None or js is None:
                continue
            if wanted:
                if digests is not None:
                    _check(name, index, key, digests[index], npy, dest, js)
                meta = decode_meta(js)
                if meta.get("key") != key:
                    raise FormatError(f"{name}: {key}.json names key {meta.get('key')!r}")
                yield SampleMeta(index, key, meta)
            index, key, npy, js, dest = index + 1, None, None, None, None
        if key is not None:
            raise FormatError(f"{name}: sample {key!r} is missing {_missing_of(npy, js)}")
        if index < stop:
            raise FormatError(f"{name}: holds {index} samples, the manifest says {shard.samples}")
    finally:
        members.close()


def _missing_of(npy: bytes | None, js: bytes | None) -> str:
    return f".{IMAGE_EXT}" if npy is None else f".{META_EXT}"


def _read_npy(parser: TarParser, member: TarMember, dest: np.ndarray, size: int, pixels: int,
              name: str) -> bytes:
    """Read a ``.npy`` member's pixels into ``dest`` and return its header, checked."""
    head_len = member.size - pixels
    if not 0 < head_len <= NPY_HEADER_MAX:
        raise FormatError(f"{name}: {member.name} holds {member.size} bytes, not a ({size}, {size}) uint8 .npy")
    head = bytearray(head_len)
    parser.read_data_into(member, [memoryview(head), memoryview(dest).cast("B")])
    shape, fortran, dtype, offset = npy_header(bytes(head))
    if dtype != np.uint8 or shape != (size, size) or offset != head_len:
        raise FormatError(f"{name}: {member.name} is {dtype} {shape}, expected uint8 ({size}, {size})")
    if fortran:  # column-major bytes: the image is their transpose
        dest[...] = dest.T.copy()
    return bytes(head)


def _check(name: str, index: int, key: str, expected: tuple[str, str], head: bytes,
           dest: np.ndarray | None, js: bytes) -> None:
    """Raise :class:`SampleChecksumError` unless the sample's members hash to ``expected``."""
    if dest is not None:
        actual = digest_of(head, memoryview(dest).cast("B"))
        if actual != expected[0]:
            raise SampleChecksumError(name, index, key, IMAGE_EXT, expected[0], actual)
    actual = digest_of(js)
    if actual != expected[1]:
        raise SampleChecksumError(name, index, key, META_EXT, expected[1], actual)


class _FileSlots:
    """A :class:`shards.tar.ByteSource` over a file descriptor with ``readinto``: positioned
    reads (no seek), passing over data without reading it."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self.size = os.fstat(fd).st_size
        self.offset = 0

    def read(self, n: int) -> bytes:
        out = os.pread(self._fd, n, self.offset)
        self.offset += len(out)
        return out

    def readinto(self, views: list[memoryview]) -> int:
        got, want = 0, sum(len(v) for v in views)
        while got < want:
            n = os.preadv(self._fd, views, self.offset)
            if n == 0:
                break
            got += n
            self.offset += n
            views = _advance(views, n)
        return got

    def skip(self, n: int) -> int:
        n = max(0, min(n, self.size - self.offset))
        self.offset += n
        return n


class _HashedFileSlots(_FileSlots):
    """:class:`_FileSlots` that reads and hashes every byte in file order (sha256, format 1)."""

    def __init__(self, fd: int) -> None:
        super().__init__(fd)
        self.sha256 = hashlib.sha256()

    def read(self, n: int) -> bytes:
        out = super().read(n)
        self.sha256.update(out)
        return out

    def readinto(self, views: list[memoryview]) -> int:
        got = super().readinto(views)
        left = got
        for v in views:
            self.sha256.update(v[:left])
            left -= min(left, len(v))
        return got

    def skip(self, n: int) -> int:
        done = 0
        while done < n and (chunk := self.read(min(n - done, READ_CHUNK))):
            done += len(chunk)
        return done

    def drain(self) -> None:
        """Read (and hash) whatever follows the end-of-archive marker."""
        while self.skip(READ_CHUNK):
            pass


class _MemorySlots:
    """A :class:`shards.tar.ByteSource` with ``readinto`` over a :class:`VerifiedShard`."""

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self.size = len(data)
        self.offset = 0

    def read(self, n: int) -> memoryview:
        out = self._data[self.offset:self.offset + n]
        self.offset += len(out)
        return out

    def readinto(self, views: list[memoryview]) -> int:
        got = 0
        for v in views:
            piece = self.read(len(v))
            v[: len(piece)] = piece
            got += len(piece)
        return got

    def skip(self, n: int) -> int:
        return len(self.read(n))


_SlotSource = _FileSlots | _MemorySlots


def _advance(views: list[memoryview], n: int) -> list[memoryview]:
    """``views`` without their first ``n`` bytes (after a short read)."""
    out = []
    for v in views:
        if n >= len(v):
            n -= len(v)
            continue
        out.append(v[n:])
        n = 0
    return out
