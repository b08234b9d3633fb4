"""The tar structure of a shard: headers, pax and GNU long names, block padding.

One parser serves the training loader (:mod:`shards.reader`, which raises on the first damage)
and verify (:mod:`shards.scan`, which turns damage into a report). It reads through a
:class:`ByteSource` that owns the I/O and the hashing, so each caller keeps its own way of
reading: the loader reads each member into its own buffer (images are views of it, no copy),
verify reads big chunks and skips the images it does not decode.

A shard holds ustar headers for members whose names fit in 100 bytes and pax (``x``) headers
for longer ones, as Python's :mod:`tarfile` writes them; GNU long names (``L``) and pax global
headers (``g``) are read too, so a shard repacked by GNU tar still parses.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Protocol

import numpy as np

from shards.format import FormatError

BLOCK = 512
"""Tar block size: headers are one block, member data is padded to a whole number of blocks."""

_REGULAR = (b"0", b"\0")
_POSIX_MAGIC = b"ustar\x0000"
_PAX_HEADER, _PAX_GLOBAL, _GNU_LONGNAME, _GNU_LONGLINK = b"x", b"g", b"L", b"K"


class TarError(FormatError):
    """A shard's tar structure is damaged.

    Attributes:
        shard: The shard file's name.
        what: What is wrong, in words, with the byte offset.
        offset: File offset of the header (or member) where the damage was found.
    """

    def __init__(self, shard: str, what: str, offset: int) -> None:
        super().__init__(f"{shard}: {what}")
        self.shard, self.what, self.offset = shard, what, offset


class TarHeaderError(TarError):
    """A header block with a bad checksum or unreadable fields, or a damaged pax header.

    ``name`` is the member name the damaged block holds, when it can be read at all (a hint:
    the block is damaged).
    """

    def __init__(self, shard: str, what: str, offset: int, name: str | None = None) -> None:
        super().__init__(shard, what, offset)
        self.name = name


class TarTruncatedError(TarError):
    """The file ends before its tar archive does.

    ``member`` names the member whose data the file ends inside; None when it ends inside or
    before a header.
    """

    def __init__(self, shard: str, what: str, offset: int, member: str | None = None) -> None:
        super().__init__(shard, what, offset)
        self.member = member


class ByteSource(Protocol):
    """Where the parser's bytes come from; the source hashes every byte it reads or skips."""

    offset: int
    """File offset of the next byte."""

    def read(self, n: int) -> bytes | bytearray | memoryview:
        """The next ``n`` bytes (fewer only at the end of the file)."""

    def skip(self, n: int) -> int:
        """Pass over the next ``n`` bytes; return how many there were."""


@dataclasses.dataclass(slots=True)  # not frozen: a frozen __init__ costs the loader ~1 us a member
class TarMember:
    """One member as its header (and any long-name header before it) describes it."""

    name: str
    size: int
    """Data bytes (the data is padded to a whole number of blocks)."""
    type: bytes
    """The header's type flag: ``b"0"`` (or ``b"\\0"``) for a regular file, ``b"5"`` a folder..."""
    offset: int
    """File offset of the member's first header (its pax or GNU long-name header if any), as
    :attr:`tarfile.TarInfo.offset`."""

    @property
    def is_file(self) -> bool:
        """True for a regular file."""
        return self.type in _REGULAR


def padded(size: int) -> int:
    """``size`` rounded up to a whole number of blocks."""
    return -(-size // BLOCK) * BLOCK


class TarParser:
    """Walks one tar archive member by member.

    Iterate :meth:`members`; for a member whose data you want, call :meth:`read_data` before
    asking for the next member, otherwise its data is skipped (still read and hashed by the
    source). Damage raises a :class:`TarError`; the iteration ends cleanly at the
    end-of-archive marker (what follows it is the caller's: ``source`` stands just after the
    marker's first block).
    """

    def __init__(self, source: ByteSource, shard: str) -> None:
        self._src, self._shard = source, shard
        self._unread: TarMember | None = None

    def members(self) -> Iterator[TarMember]:
        """Yield each member (long-name and pax headers are folded into the member they name).

        Raises:
            TarHeaderError: a header with a bad checksum or fields, or a damaged pax header.
            TarTruncatedError: the file ends inside a header, inside a member, or before the
                end-of-archive marker.
        """
        src = self._src
        long_name: str | None = None
        long_size: int | None = None
        start: int | None = None  # offset of the member's first header, extended ones included
        while True:
            at = src.offset
            start = at if start is None else start
            block = bytes(src.read(BLOCK))
            if len(block) < BLOCK:
                what = ("file ends without the tar end-of-archive marker" if not block
                        else f"file ends inside the tar header at byte {at}")
                raise TarTruncatedError(self._shard, what, at)
            if not any(block):
                return  # the end-of-archive marker
            kind, name, size = self._header(block, at, named=long_name is not None)
            if kind in (_PAX_HEADER, _GNU_LONGNAME, _PAX_GLOBAL, _GNU_LONGLINK):
                data = bytes(src.read(padded(size)))
                if len(data) < padded(size):
                    raise TarTruncatedError(self._shard, f"file ends inside an extended header at byte {at}", at)
                if kind == _PAX_HEADER:
                    records = self._pax(data[:size], at)
                    long_name = records.get("path", long_name)
                    long_size = self._pax_size(records, at) if "size" in records else long_size
                elif kind == _GNU_LONGNAME:
                    long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
                continue  # a pax global header or a GNU long link name: nothing a shard needs
            member = TarMember(long_name if long_name is not None else name,
                               long_size if long_size is not None else size, kind, start)
            long_name = long_size = start = None
            self._unread = member
            yield member
            if self._unread is member:
                self._unread = None
                n = padded(member.size)
                if src.skip(n) < n:
                    raise self._truncated_in(member)

    def read_data(self, member: TarMember) -> bytes | bytearray | memoryview:
        """The data of ``member``, the one just yielded: exactly ``member.size`` bytes.

        What the source returns, trimmed without a copy: with :class:`shards.reader`'s source
        a buffer of its own (a memoryview of it when there is padding to trim).

        Raises:
            TarTruncatedError: the file ends inside the member (data or padding).
            ValueError: ``member`` is not the member just yielded, or its data was read already.
        """
        if member is not self._unread:
            raise ValueError(f"{member.name}: not the member just yielded, or read already")
        self._unread = None
        n = padded(member.size)
        data = self._src.read(n)
        if len(data) < n:
            raise self._truncated_in(member)
        return data if n == member.size else memoryview(data)[: member.size]

    def read_data_into(self, member: TarMember, views: list[memoryview]) -> None:
        """Read the data of ``member``, the one just yielded, into ``views`` one after another
        (their lengths add up to ``member.size``), and pass over its padding: the bytes land
        where the caller wants them, with no copy in between. The source must have a
        ``readinto(views) -> int`` (:class:`shards.reader`'s sources have).

        Raises:
            TarTruncatedError: the file ends inside the member (data or padding).
            ValueError: ``member`` is not the member just yielded, or the views do not fit it.
        """
        if member is not self._unread:
            raise ValueError(f"{member.name}: not the member just yielded, or read already")
        if sum(len(v) for v in views) != member.size:
            raise ValueError(f"{member.name}: {member.size} bytes, views for {sum(len(v) for v in views)}")
        self._unread = None
        pad = padded(member.size) - member.size
        if self._src.readinto(views) < member.size or self._src.skip(pad) < pad:  # type: ignore[attr-defined]
            raise self._truncated_in(member)

    def _truncated_in(self, member: TarMember) -> TarTruncatedError:
        return TarTruncatedError(self._shard, f"file ends inside member {member.name}", member.offset, member.name)

    def _header(self, block: bytes, at: int, *, named: bool) -> tuple[bytes, str, int]:
        """(type, name, size) of a header block, its checksum checked."""
        name = _ustar_name(block)
        try:
            stored = _number(block[148:156])
            size = _number(block[124:136])
        except ValueError as exc:
            raise TarHeaderError(self._shard, f"damaged tar header at byte {at} ({exc})", at,
                                 None if named else name) from None
        if stored != _checksum(block):
            raise TarHeaderError(self._shard, f"damaged tar header at byte {at} (bad checksum)", at,
                                 None if named else name)
        return block[156:157], name, size

    def _pax(self, data: bytes, at: int) -> dict[str, str]:
        """The records (``"<len> <key>=<value>\\n"``) of a pax extended header."""
        out: dict[str, str] = {}
        pos = 0
        try:
            while pos < len(data) and data[pos] != 0:
                space = data.index(b" ", pos)
                length = int(data[pos:space])
                if length <= space - pos or pos + length > len(data) or data[pos + length - 1] != 0x0A:
                    raise ValueError(f"bad record length {length}")
                key, eq, value = data[space + 1 : pos + length - 1].partition(b"=")
                if not eq:
                    raise ValueError(f"record {key[:40]!r} has no '='")
                out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
                pos += length
        except ValueError as exc:
            raise TarHeaderError(self._shard, f"damaged pax header at byte {at} ({exc})", at) from None
        return out

    def _pax_size(self, records: dict[str, str], at: int) -> int:
        try:
            size = int(records["size"])
        except ValueError:
            size = -1
        if size < 0:
            raise TarHeaderError(self._shard, f"damaged pax header at byte {at} (size {records['size']!r})", at)
        return size


def _number(field: bytes) -> int:
    """A numeric header field: octal text, or GNU base-256 (first byte 0x80) for big values."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise ValueError(f"field {bytes(field)!r} is not a number") from None


def _checksum(block: bytes) -> int:
    """The checksum a header block should store: the sum of its bytes with the checksum
    field (bytes 148 to 155) counted as eight spaces (POSIX.1-1988). numpy sums the block
    in one call, which costs the loader less than Python summing two slices of it."""
    return int(np.frombuffer(block, np.uint8).sum(dtype=np.int64)) - sum(block[148:156]) + 8 * 32


def _ustar_name(block: bytes) -> str:
    name = block[0:100].split(b"\0", 1)[0]
    if block[257:265] == _POSIX_MAGIC:
        prefix = block[345:500].split(b"\0", 1)[0]
        if prefix:
            name = prefix + b"/" + name
    return name.decode("utf-8", "surrogateescape")
