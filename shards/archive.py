"""A source archive (``.zip`` or uncompressed ``.tar``) read in place: its member index, and
one member's bytes read by offset.

An ingest given ``--dicom-dir data.zip`` never unpacks it: on a parallel filesystem 30,000
small files cost the metadata servers more than the reads. The driver reads the index once
(a zip's central directory, a tar's headers) into an :class:`ArchiveIndex`; each worker gets
the :class:`Member` records of its own samples and reads them with ``pread`` at their
offsets. A stored zip member is its bytes; a deflated one is inflated in memory and checked
against its CRC-32 and size.

Two kinds of failure, two errors:

* :class:`ArchiveError`: the archive as a whole cannot be read (not a zip/tar, its central
  directory damaged, a compressed tar): a usage error before any work.
* :class:`MemberError`: one member cannot be read (bad CRC, cut short, an unsupported
  compression or encryption): that member's reject, with :attr:`MemberError.reason`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path
from types import TracebackType
from typing import Literal

log = logging.getLogger(__name__)

ARCHIVE_SUFFIXES = (".zip", ".tar")
"""Suffixes of the archives read in place (any case)."""
ZIP_STORED = zipfile.ZIP_STORED
ZIP_DEFLATED = zipfile.ZIP_DEFLATED
TAR_SPARSE = -1
""":attr:`Member.method` of a sparse tar member, whose bytes are not laid out in one run."""
_LOCAL_HEADER = 30
"""Fixed part of a zip local file header; the name and extra field follow it."""
_LOCAL_SIGNATURE = b"PK\x03\x04"
_ENCRYPTED = 0x1
"""Zip general-purpose flag bit: the member is encrypted."""
_HINT_SLACK = 1024
"""Bytes past a zip member's stored data that a read-ahead hint also covers: its local
header's name and extra field, whose lengths only the local header gives."""
_COMPRESSED_MAGIC = (b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"\x28\xb5\x2f\xfd")
"""How a gzip, bzip2, xz or zstd stream starts: a compressed tar has no offsets to read at."""

ArchiveKind = Literal["zip", "tar"]
CORRUPT = "corrupt_member"
"""Reject reason: the member's bytes are damaged (CRC, size, cut short, bad local header)."""
UNSUPPORTED = "unsupported_member"
"""Reject reason: the member is encrypted or compressed in a way not read in place."""


class ArchiveError(ValueError):
    """The archive as a whole cannot be read; the message is one line naming the archive."""


class MemberError(OSError):
    """One member cannot be read; ``reason`` is its reject reason, ``detail`` says why."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclasses.dataclass(frozen=True)
class Member:
    """Where one member's bytes lie in its archive."""

    name: str
    """Path inside the archive (posix): the sample's source path."""
    size: int
    """Bytes once read (uncompressed)."""
    offset: int
    """Zip: offset of the local file header; tar: offset of the data."""
    stored: int
    """Bytes the member takes in the archive (compressed size)."""
    method: int = ZIP_STORED
    """Zip compression method (0 stored, 8 deflate); a tar member is stored, or :data:`TAR_SPARSE`."""
    crc: int | None = None
    """CRC-32 of the uncompressed bytes (zip); None for tar, which keeps none."""
    flags: int = 0
    """Zip general-purpose flags (bit 0: encrypted)."""


@dataclasses.dataclass(frozen=True)
class ArchiveIndex:
    """An archive's regular members by name, as the driver read them once."""

    path: str
    kind: ArchiveKind
    members: dict[str, Member]
    stamp: tuple[int, int] | None = None
    """``(size, mtime_ns)`` of the archive when the index was read: a reader refuses an
    archive that has changed since, whose offsets would point at other bytes (a tar keeps no
    CRC that would catch it)."""

    def subset(self, names: list[str] | tuple[str, ...]) -> "ArchiveIndex":
        """The same archive with only ``names`` (what one task ships to its worker)."""
        return ArchiveIndex(self.path, self.kind, {n: self.members[n] for n in names}, self.stamp)


def is_archive(path: Path | str) -> bool:
    """True for an existing file named ``*.zip`` or ``*.tar`` (any case)."""
    p = Path(path)
    return p.suffix.lower() in ARCHIVE_SUFFIXES and p.is_file()


def _zip_members(path: Path) -> list[Member]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, ValueError, EOFError) as exc:
        raise ArchiveError(f"{path}: not a readable zip archive ({exc})") from exc
    return [
        Member(i.filename, i.file_size, i.header_offset, i.compress_size, i.compress_type, i.CRC, i.flag_bits)
        for i in infos
        if not i.is_dir() and not stat.S_ISLNK(i.external_attr >> 16)
    ]


def _tar_members(path: Path) -> list[Member]:
    with open(path, "rb") as f:
        if f.read(6).startswith(_COMPRESSED_MAGIC):
            raise ArchiveError(f"{path}: a compressed tar cannot be read in place; use an uncompressed .tar or a .zip")
    try:
        with tarfile.open(path, mode="r:") as tf:
            try:
                tf.getmembers()
            except tarfile.ReadError as exc:
                # Cut short inside a member's data: the members before it are whole, and that
                # member's read meets the end (a ``truncated`` reject), as a cut file does.
                if "unexpected end of data" not in str(exc) or not tf.members:
                    raise
                log.warning("%s ends inside the data of %s; reading the members before it", path, tf.members[-1].name)
            infos = tf.members
    except (tarfile.TarError, OSError, ValueError, EOFError) as exc:
        raise ArchiveError(f"{path}: not a readable tar archive ({exc})") from exc
    members: list[Member] = []
    regular: dict[str, Member] = {}
    for i in infos:
        if i.isreg():
            m = Member(i.name, i.size, i.offset_data, i.size, TAR_SPARSE if i.issparse() else ZIP_STORED)
            regular[i.name] = m
            members.append(m)
        elif i.islnk() and i.linkname in regular:  # a hard link: a file of its own in a folder
            members.append(dataclasses.replace(regular[i.linkname], name=i.name))
    return members


def read_index(path: Path | str) -> ArchiveIndex:
    """Read the archive's member index once: regular members only (no folders or symbolic
    links; a tar's hard link is a member of its own, as the file is once unpacked).

    Raises:
        ArchiveError: the archive cannot be read, or holds two members of the same name
            (a member's name is its source path, so it must name one member).
    """
    p = Path(path)
    kind: ArchiveKind = "zip" if p.suffix.lower() == ".zip" else "tar"
    try:
        before = p.stat()
        members = _zip_members(p) if kind == "zip" else _tar_members(p)
    except OSError as exc:
        raise ArchiveError(f"{p}: cannot read the archive ({exc})") from exc
    by_name: dict[str, Member] = {}
    for m in members:
        if m.name in by_name:
            raise ArchiveError(f"{p}: holds two members named {m.name!r}; a member's name must identify it")
        by_name[m.name] = m
    return ArchiveIndex(str(p), kind, by_name, (before.st_size, before.st_mtime_ns))


class ArchiveReader:
    """One open archive; :meth:`read` returns a member's bytes, read at its offset.

    Use as a context manager. Opening raises ``OSError`` when the archive cannot be opened or
    has changed since its index was read.
    """

    def __init__(self, index: ArchiveIndex) -> None:
        self._index = index
        self._fd = os.open(index.path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(self._fd)
        self._end = st.st_size
        if index.stamp is not None and (st.st_size, st.st_mtime_ns) != index.stamp:
            os.close(self._fd)
            raise OSError(f"{index.path} has changed since its member index was read (size or modification time)")

    def __enter__(self) -> "ArchiveReader":
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def hint(self, member: Member) -> None:
        """Ask the kernel to start reading ``member``'s bytes; any error is left to the read."""
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        slack = _HINT_SLACK if self._index.kind == "zip" else 0
        try:
            advise(self._fd, member.offset, member.stored + slack, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass

    def read(self, member: Member) -> bytes:
        """The member's bytes, inflated and checked where the archive keeps a CRC.

        Raises:
            MemberError: the member is damaged, cut short, encrypted, or compressed with
                another method than stored or deflate.
            OSError: the archive cannot be read.
        """
        if member.method == TAR_SPARSE:
            raise MemberError(UNSUPPORTED, "a sparse tar member (its bytes are not stored in one run)")
        if member.flags & _ENCRYPTED:
            raise MemberError(UNSUPPORTED, "an encrypted zip member")
        if member.method not in (ZIP_STORED, ZIP_DEFLATED):
            raise MemberError(UNSUPPORTED, f"zip compression method {member.method}; only stored (0) and deflate (8) are read in place")
        start = self._data_offset(member) if self._index.kind == "zip" else member.offset
        raw = self._pread(start, member.stored)
        data = _inflate(raw, member) if member.method == ZIP_DEFLATED else raw
        if len(data) != member.size:
            raise MemberError(CORRUPT, f"{len(data)} bytes where the archive index says {member.size}")
        if member.crc is not None and zlib.crc32(data) != member.crc:
            raise MemberError(CORRUPT, f"CRC-32 {zlib.crc32(data):08x} where the archive index says {member.crc:08x}: the member is damaged")
        return data

    def head(self, member: Member, n: int) -> bytes:
        """The first ``n`` bytes of ``member``, or b"" when they cannot be read: enough to
        check a preamble without inflating a whole member."""
        if member.flags & _ENCRYPTED or member.method not in (ZIP_STORED, ZIP_DEFLATED):
            return b""
        try:
            start = self._data_offset(member) if self._index.kind == "zip" else member.offset
            if member.method == ZIP_STORED:
                return self._pread(start, min(n, member.stored))
            raw = self._pread(start, min(member.stored, max(n * 4, 4096)))
            return zlib.decompressobj(-zlib.MAX_WBITS).decompress(raw, n)
        except (OSError, zlib.error):
            return b""

    def _pread(self, start: int, length: int) -> bytes:
        if start + length > self._end:
            have = max(0, self._end - start)
            raise MemberError(CORRUPT, f"truncated: the archive ends {have} bytes into the member's {length} stored bytes")
        chunks: list[bytes] = []
        got = 0
        while got < length:
            chunk = os.pread(self._fd, length - got, start + got)
            if not chunk:
                raise MemberError(CORRUPT, f"truncated: the archive ends {got} bytes into the member's {length} stored bytes")
            chunks.append(chunk)
            got += len(chunk)
        return b"".join(chunks)

    def _data_offset(self, member: Member) -> int:
        head = self._pread(member.offset, _LOCAL_HEADER)
        if head[:4] != _LOCAL_SIGNATURE:
            raise MemberError(CORRUPT, f"no zip local header at offset {member.offset} (the archive index points at other bytes)")
        name_len = int.from_bytes(head[26:28], "little")
        extra_len = int.from_bytes(head[28:30], "little")
        return member.offset + _LOCAL_HEADER + name_len + extra_len


def read_member(archive: Path | str, name: str) -> bytes:
    """The bytes of the member ``name`` of ``archive``, its index read for this one read.

    Raises:
        ArchiveError: the archive cannot be read.
        OSError: no such member, or it cannot be read (:class:`MemberError`).
    """
    index = read_index(archive)
    if name not in index.members:
        raise FileNotFoundError(f"{archive} holds no member {name!r}")
    with ArchiveReader(index) as reader:
        return reader.read(index.members[name])


def top_folders(index: ArchiveIndex) -> list[str]:
    """The archive's top-level folders (``name/``), sorted: what ``--members`` can name."""
    return sorted({name.split("/", 1)[0] + "/" for name in index.members if "/" in name})


def hash_members(index: ArchiveIndex) -> dict[str, str]:
    """sha256 of each member of ``index`` (as :func:`shards.scan.hash_files` does for files);
    a member that cannot be read maps to ``"error: ..."``."""
    out: dict[str, str] = {}
    try:
        reader = ArchiveReader(index)
    except OSError as exc:
        return {name: f"error: {exc.strerror or exc}" for name in index.members}
    with reader:
        for name, member in index.members.items():
            try:
                out[name] = hashlib.sha256(reader.read(member)).hexdigest()
            except MemberError as exc:
                out[name] = f"error: {exc.reason}: {exc.detail}"
            except OSError as exc:
                out[name] = f"error: {exc.strerror or exc}"
    return out


def _inflate(raw: bytes, member: Member) -> bytes:
    """Inflate a raw deflate stream, refusing more bytes than the index declares."""
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        out = d.decompress(raw, member.size + 1)
    except zlib.error as exc:
        raise MemberError(CORRUPT, f"its deflate data is damaged ({exc})") from exc
    if len(out) > member.size:
        raise MemberError(CORRUPT, f"inflates past the {member.size} bytes the archive index declares")
    if not d.eof:
        raise MemberError(CORRUPT, f"truncated: its deflate data ends after {len(out)} of {member.size} bytes")
    return out

