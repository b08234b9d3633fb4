"""The one tar parser (shards.tar) on its own, and through both of its readers: the loader's
iter_samples (raises) and verify's scan_shard (reports)."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest

from shards.format import FormatError, check_member_name, encode_image
from shards.reader import _FileSlots, iter_samples
from shards.scan import scan_shard
from shards.tar import BLOCK, TarHeaderError, TarParser, TarTruncatedError, padded

LONG = "k" * 120  # member names longer than the 100 bytes of a ustar name field


class _Bytes:
    """A ByteSource over bytes in memory."""

    def __init__(self, data: bytes) -> None:
        self._data, self.offset = data, 0

    def read(self, n: int) -> bytes:
        out = self._data[self.offset : self.offset + n]
        self.offset += len(out)
        return out

    def skip(self, n: int) -> int:
        return len(self.read(n))


def _sample(key: str) -> list[tuple[str, bytes]]:
    meta = {"key": key, "split": "train", "target": 0, "boxes": []}
    return [(f"{key}.npy", encode_image(np.full((8, 8), 7, np.uint8))), (f"{key}.json", json.dumps(meta).encode())]


def _tar(members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _offsets(data: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return tar.getmembers()


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_long_names_are_read_whole(fmt: int) -> None:
    members = _sample("a") + _sample(LONG)
    data = _tar(members, fmt)
    parser = TarParser(_Bytes(data), "s.tar")
    got = [(m.name, m.size, bytes(parser.read_data(m))) for m in parser.members()]
    assert got == [(n, len(d), d) for n, d in members]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT], ids=["pax", "gnu"])
def test_both_readers_take_long_names(tmp_path: Path, fmt: int) -> None:
    path = tmp_path / "s.tar"
    path.write_bytes(_tar(_sample("a") + _sample(LONG), fmt))
    assert [s.key for s in iter_samples(path, size=8)] == ["a", LONG]
    scan = scan_shard(path, split="train", size=8)
    assert scan.keys == ["a", LONG] and scan.complete and not scan.problems


def test_unread_members_are_skipped_and_offsets_match_tarfile() -> None:
    data = _tar(_sample("a") + _sample(LONG))
    source = _Bytes(data)
    members = list(TarParser(source, "s.tar").members())
    assert [m.offset for m in members] == [i.offset for i in _offsets(data)]
    last = _offsets(data)[-1]
    assert source.offset == last.offset_data + padded(last.size) + BLOCK  # its data skipped, then the end marker


def _damage(data: bytes, how: str) -> bytes:
    second = _offsets(data)[1]  # a.json
    if how == "checksum":
        b = bytearray(data)
        b[second.offset + 140] ^= 0xFF  # the mtime field: the stored checksum no longer holds
        return bytes(b)
    if how == "in-header":
        return data[: second.offset + 100]
    if how == "in-member":
        return data[: second.offset_data + 10]
    if how == "in-padding":
        return data[: second.offset_data + second.size + 1]
    if how == "no-end-marker":
        return data[: second.offset_data + BLOCK]
    raise AssertionError(how)


DAMAGE = [  # (damage, error, member named by the error, scan check, key the scan names)
    ("checksum", TarHeaderError, None, "tar_header", "a"),
    ("in-header", TarTruncatedError, None, "tar_truncated", "a"),
    ("in-member", TarTruncatedError, "a.json", "tar_truncated", "a"),
    ("in-padding", TarTruncatedError, "a.json", "tar_truncated", "a"),
    ("no-end-marker", TarTruncatedError, None, "tar_truncated", None),
]


@pytest.mark.parametrize("how, error, member, check, key", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damage_raises_in_the_parser(how: str, error: type, member: str | None, check: str, key: str | None) -> None:
    data = _damage(_tar(_sample("a")), how)
    parser = TarParser(_Bytes(data), "s.tar")
    with pytest.raises(error) as err:
        for m in parser.members():
            parser.read_data(m)
    assert err.value.shard == "s.tar" and str(err.value).startswith("s.tar: ")
    assert getattr(err.value, "member", None) == member
    if how == "checksum":
        assert err.value.name == "a.json" and "bad checksum" in err.value.what
    if how == "in-member":  # skipping the member finds the same truncation
        with pytest.raises(error):
            list(TarParser(_Bytes(data), "s.tar").members())


@pytest.mark.parametrize("how, error, member, check, key", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_damage_through_both_readers(tmp_path: Path, how: str, error: type, member: str | None, check: str,
                                     key: str | None) -> None:
    path = tmp_path / "s.tar"
    path.write_bytes(_damage(_tar(_sample("a")), how))
    with pytest.raises(FormatError, match="s.tar: "):
        list(iter_samples(path, size=8))
    scan = scan_shard(path, split="train", size=8)
    assert [(p.check, p.key) for p in scan.problems] == [(check, key)]
    assert not scan.complete


@pytest.mark.parametrize("at", [0, 99, 124, 147, 148, 153, 156, 257, 345, 511],
                         ids=["name", "name-end", "size", "before-checksum", "checksum-first",
                              "checksum-last-digit", "type", "magic", "prefix", "last-byte"])
@pytest.mark.parametrize("delta", [1, 0x80], ids=["low-bit", "high-bit"])
def test_a_changed_byte_anywhere_in_a_header_fails_its_checksum(at: int, delta: int) -> None:
    data = bytearray(_tar(_sample("a")))
    data[at] = (data[at] + delta) % 256
    with pytest.raises(TarHeaderError, match="at byte 0"):
        list(TarParser(_Bytes(bytes(data)), "s.tar").members())


@pytest.mark.parametrize("name, safe", [
    ("k.npy", True),
    ("1.2.840.113619.2.55.3.json", True),
    ("..k.npy", True),
    (".", True),
    ("..", False),
    ("/k.npy", False),
    ("a/k.npy", False),
    ("../k.npy", False),
    ("a/../../k.npy", False),
    ("a\\k.npy", False),
    ("..\\k.npy", False),
], ids=["plain", "dotted-uid", "leading-dots", "dot", "dotdot", "absolute", "folder", "parent",
        "parent-inside", "backslash", "backslash-parent"])
def test_member_names_with_a_separator_or_dotdot_are_unsafe(name: str, safe: bool) -> None:
    if safe:
        check_member_name(name)
    else:
        with pytest.raises(FormatError, match="unsafe member name"):
            check_member_name(name)


@pytest.mark.parametrize("record, reason", [
    (b"99 path=a.npy\n", "bad record length 99"),
    (b"x path=a.npy\n", "invalid literal"),
    (b"12 pathanpy\n", "has no '='"),
    (b"11 size=-1\n", "size '-1'"),
], ids=["length-past-end", "length-not-a-number", "no-equals", "negative-size"])
def test_damaged_pax_records_are_header_errors(record: bytes, reason: str) -> None:
    info = tarfile.TarInfo("././@PaxHeader")
    info.type, info.size = tarfile.XHDTYPE, len(record)
    header = info.tobuf(tarfile.USTAR_FORMAT)
    data = header + record.ljust(BLOCK, b"\0") + _tar(_sample("a"))
    with pytest.raises(TarHeaderError, match="damaged pax header at byte 0") as err:
        list(TarParser(_Bytes(data), "s.tar").members())
    assert reason in err.value.what


def test_read_data_only_for_the_member_just_yielded() -> None:
    parser = TarParser(_Bytes(_tar(_sample("a"))), "s.tar")
    members = parser.members()
    first = next(members)
    parser.read_data(first)
    with pytest.raises(ValueError, match="read already"):
        parser.read_data(first)


def test_loader_images_are_views_of_the_member_buffer(tmp_path: Path) -> None:
    path = tmp_path / "s.tar"
    path.write_bytes(_tar(_sample("a")))
    (sample,) = iter_samples(path, size=8)
    assert not sample.image.flags.owndata and not sample.image.flags.writeable
    assert int(sample.image.sum()) == 7 * 64


@pytest.mark.parametrize("key_len", [8, 90, 96, 97, 128])  # a name past 100 characters needs a pax header
def test_writer_bytes_are_tarfiles_pax_bytes(tmp_path: Path, key_len: int) -> None:
    """The writer frames members itself (no copies of the pixels); its file is byte for byte
    what ``tarfile`` writes for the same members, C- and Fortran-ordered images alike."""
    from shards.format import TAR_MODE, TAR_MTIME, encode_meta
    from shards.writer import ShardWriter

    rng = np.random.default_rng(key_len)
    images = [rng.integers(0, 256, (33, 65), dtype=np.uint8) for _ in range(3)]
    images[1] = np.asfortranarray(images[1])
    keys = [f"{i}".rjust(key_len, "k") for i in range(3)]
    with ShardWriter(tmp_path / "ours.tar") as writer:
        for key, image in zip(keys, images):
            writer.write(key, image, {"key": key, "note": "é"})
    expected = io.BytesIO()
    with tarfile.open(fileobj=expected, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, image in zip(keys, images):
            for name, data in ((f"{key}.npy", encode_image(image)), (f"{key}.json", encode_meta({"key": key, "note": "é"}))):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data), TAR_MTIME, TAR_MODE, 0, 0, "", "")
                tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "ours.tar").read_bytes() == expected.getvalue()
    for image in images:  # and the .npy members are np.save's bytes
        npy = io.BytesIO()
        np.save(npy, np.ascontiguousarray(image), allow_pickle=False)
        assert encode_image(image) == npy.getvalue()
    assert writer.result is not None and writer.result.bytes == len(expected.getvalue())


@pytest.mark.parametrize("name", ["k.npy", "k" * 100, "k" * 101, "é.json", ""])
@pytest.mark.parametrize("size", [0, 1, 409_728, 8**11 - 1, 8**11])  # 8**11 bytes: past ustar's size field
def test_member_headers_built_from_the_template_are_tarfiles(name: str, size: int) -> None:
    from shards.format import TAR_MODE, TAR_MTIME
    from shards.writer import member_header

    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = size, TAR_MTIME, TAR_MODE, 0, 0, "", ""
    assert member_header(name, size) == info.tobuf(tarfile.PAX_FORMAT, tarfile.ENCODING, "strict")


def test_writer_not_durable_writes_the_same_bytes_and_hands_its_file_to_the_flusher(tmp_path: Path) -> None:
    """``durable=False`` (the ingest's workers): the same bytes as a durable write; the file's
    write-back and page drop happen in the flusher's thread, which closes its descriptor."""
    from shards import writer as writer_mod

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def shard(path: Path, durable: bool) -> None:
        with writer_mod.ShardWriter(path, durable=durable) as w:
            for i in range(3):
                w.write(f"k{i}", np.full((64, 64), i, np.uint8), {"key": f"k{i}"})

    shard(tmp_path / "durable.tar", True)
    before = fds()
    for i in range(3):
        shard(tmp_path / f"fast-{i}.tar", False)
    pending = writer_mod._FLUSHER._pending
    assert pending is not None and pending.name == "pneumo-shard-flush"
    pending.join(timeout=30)
    assert fds() == before
    for i in range(3):
        assert (tmp_path / f"fast-{i}.tar").read_bytes() == (tmp_path / "durable.tar").read_bytes()


def test_flusher_holds_back_a_writer_whose_last_shard_is_not_on_disk_yet(tmp_path: Path, monkeypatch) -> None:
    """One write-back at a time: with the disk slower than the writer, the next shard's close
    waits for the last one instead of piling up dirty pages. The disk is made slow from
    outside (``os.fdatasync`` held by the test)."""
    import threading

    from shards import writer as writer_mod

    disk_free = threading.Event()
    real_fdatasync = os.fdatasync
    monkeypatch.setattr(writer_mod.os, "fdatasync", lambda fd: (disk_free.wait(30), real_fdatasync(fd)))
    flusher = writer_mod._Flusher()
    monkeypatch.setattr(writer_mod, "_FLUSHER", flusher)

    def shard(name: str) -> None:
        with writer_mod.ShardWriter(tmp_path / name, durable=False) as w:
            w.write("k", np.zeros((8, 8), np.uint8), {"key": "k"})

    shard("a.tar")  # its write-back now waits on the slow disk
    second = threading.Thread(target=shard, args=("b.tar",))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive(), "the second shard's close did not wait for the first one's write-back"
    disk_free.set()
    second.join(timeout=30)
    assert not second.is_alive()
    flusher._pending.join(timeout=30)
    assert (tmp_path / "a.tar").read_bytes() == (tmp_path / "b.tar").read_bytes()


FILE_READS = [  # (operations on the source: ("read", n), ("into", [view sizes]), ("skip", n))
    [("read", 512), ("read", 512), ("read", 100)],
    [("read", 512), ("into", [128, 4096]), ("skip", 384), ("read", 512), ("read", 1024)],
    [("into", [100, 20_000]), ("read", 512), ("into", [7]), ("read", 9000)],
    [("skip", 30_000), ("read", 512), ("skip", 1), ("into", [511, 1])],
    [("read", 40_000), ("read", 10), ("into", [10, 10])],  # past the end of the file
    [("skip", 39_990), ("into", [5, 5, 5])],
]


@pytest.mark.parametrize("ops", FILE_READS, ids=["headers", "sample", "into-then-far", "skips", "past-end",
                                                 "into-past-end"])
def test_the_loaders_file_source_returns_the_files_bytes(tmp_path: Path, ops: list) -> None:
    data = os.urandom(40_000)
    path = tmp_path / "s.tar"
    path.write_bytes(data)
    with open(path, "rb", buffering=0) as f:
        src, at = _FileSlots(f.fileno()), 0
        for op, arg in ops:
            if op == "read":
                assert src.read(arg) == data[at:at + arg]
                at = min(at + arg, len(data))
            elif op == "skip":
                assert src.skip(arg) == min(arg, len(data) - at)
                at = min(at + arg, len(data))
            else:
                views = [memoryview(bytearray(n)) for n in arg]
                got = src.readinto(views)
                assert got == min(sum(arg), len(data) - at)
                assert b"".join(bytes(v) for v in views)[:got] == data[at:at + got]
                at += got
            assert src.offset == at
