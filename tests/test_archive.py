"""Reading a source archive in place: the member index, members by offset, damaged members."""

from __future__ import annotations

import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from shards.archive import (
    CORRUPT,
    UNSUPPORTED,
    ArchiveError,
    ArchiveReader,
    MemberError,
    is_archive,
    read_index,
    read_member,
    top_folders,
)
from shards.source import discover, discover_archive, members_prefix

PREAMBLE_FILE = b"\0" * 128 + b"DICM" + b"rest of a DICOM header" * 20
PAYLOAD = bytes(range(256)) * 40 + b"tail"


def _zip(path: Path, files: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            info = zipfile.ZipInfo(name, (1980, 1, 1, 0, 0, 0))
            info.compress_type = method
            zf.writestr(info, data)
    return path


def _tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tf:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def _archive(tmp_path: Path, kind: str, files: dict[str, bytes]) -> Path:
    if kind == "tar":
        return _tar(tmp_path / "a.tar", files)
    method = zipfile.ZIP_STORED if kind == "zip-stored" else zipfile.ZIP_DEFLATED
    return _zip(tmp_path / "a.zip", files, method)


def _data_span(path: Path, name: str) -> tuple[int, int]:
    """(offset, length) of ``name``'s stored bytes in the archive at ``path``."""
    index = read_index(path)
    m = index.members[name]
    if index.kind == "tar":
        return m.offset, m.stored
    head = path.read_bytes()[m.offset : m.offset + 30]
    return m.offset + 30 + int.from_bytes(head[26:28], "little") + int.from_bytes(head[28:30], "little"), m.stored


KINDS = ["zip-deflated", "zip-stored", "tar"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("data", [b"", b"x", PAYLOAD], ids=["empty", "one-byte", "10-kB"])
def test_member_read_by_offset_is_its_bytes(tmp_path: Path, kind: str, data: bytes) -> None:
    path = _archive(tmp_path, kind, {"d/first.bin": b"before", "d/m.dcm": data, "z.csv": b"after"})
    index = read_index(path)
    with ArchiveReader(index) as reader:
        assert reader.read(index.members["d/m.dcm"]) == data
        assert reader.read(index.members["z.csv"]) == b"after"


def _flip_middle(path: Path, name: str) -> None:
    start, length = _data_span(path, name)
    raw = bytearray(path.read_bytes())
    raw[start + length // 2] ^= 0xFF
    path.write_bytes(bytes(raw))


def _cut_inside(path: Path, name: str) -> None:
    start, length = _data_span(path, name)
    path.write_bytes(path.read_bytes()[: start + length // 2])


def _break_local_header(path: Path, name: str) -> None:
    m = read_index(path).members[name]
    raw = bytearray(path.read_bytes())
    raw[m.offset] = ord("X")
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize(
    "kind, damage, reason, detail",
    [
        ("zip-stored", _flip_middle, CORRUPT, "CRC-32"),
        ("zip-deflated", _flip_middle, CORRUPT, ""),  # deflate error or CRC, whichever the flip gives
        ("zip-stored", _break_local_header, CORRUPT, "no zip local header"),
        ("tar", _cut_inside, CORRUPT, "truncated"),
    ],
    ids=["stored-bad-crc", "deflated-bit-flip", "bad-local-header", "tar-cut-short"],
)
def test_damaged_member_is_a_member_error_with_a_reason(tmp_path: Path, kind: str, damage, reason: str, detail: str) -> None:
    path = _archive(tmp_path, kind, {"ok.dcm": b"fine", "bad.dcm": PAYLOAD})
    damage(path, "bad.dcm")
    index = read_index(path)
    with ArchiveReader(index) as reader:
        with pytest.raises(MemberError) as err:
            reader.read(index.members["bad.dcm"])
        assert reader.read(index.members["ok.dcm"]) == b"fine"
    assert err.value.reason == reason and detail in err.value.detail and "\n" not in err.value.detail


def test_deflate_stream_cut_short_is_truncated(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", {"m.dcm": PAYLOAD + bytes(range(256)) * 300})
    index = read_index(path)
    m = index.members["m.dcm"]
    half = type(m)(m.name, m.size, m.offset, m.stored // 2, m.method, m.crc, m.flags)
    with ArchiveReader(index) as reader, pytest.raises(MemberError) as err:
        reader.read(half)
    assert err.value.reason == CORRUPT and "truncated: its deflate data ends after" in err.value.detail


@pytest.mark.parametrize(
    "flags, method, detail",
    [(0x1, zipfile.ZIP_STORED, "encrypted"), (0, zipfile.ZIP_BZIP2, "compression method 12")],
    ids=["encrypted", "bzip2"],
)
def test_unsupported_member_is_a_member_error(tmp_path: Path, flags: int, method: int, detail: str) -> None:
    path = _zip(tmp_path / "a.zip", {"m.dcm": PAYLOAD})
    index = read_index(path)
    m = index.members["m.dcm"]
    odd = type(m)(m.name, m.size, m.offset, m.stored, method, m.crc, flags)
    with ArchiveReader(index) as reader, pytest.raises(MemberError) as err:
        reader.read(odd)
    assert err.value.reason == UNSUPPORTED and detail in err.value.detail


@pytest.mark.parametrize(
    "name, content, expect",
    [
        ("a.zip", b"this is not a zip", "not a readable zip archive"),
        ("a.tar", b"this is not a tar" * 40, "not a readable tar archive"),
        ("a.tar", b"\x1f\x8b\x08" + b"\0" * 100, "a compressed tar cannot be read in place"),
        ("a.tar", b"\xfd7zXZ\x00" + b"\0" * 100, "a compressed tar cannot be read in place"),
        ("a.zip", b"", "not a readable zip archive"),
    ],
    ids=["zip-garbage", "tar-garbage", "tar-gz", "tar-xz", "empty-file"],
)
def test_unreadable_archive_is_an_archive_error(tmp_path: Path, name: str, content: bytes, expect: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ArchiveError, match=expect) as err:
        read_index(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_zip_cut_short_loses_its_central_directory(tmp_path: Path) -> None:
    path = _zip(tmp_path / "a.zip", {"m.dcm": PAYLOAD})
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(ArchiveError, match="not a readable zip archive"):
        read_index(path)


def test_two_members_of_one_name_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf, pytest.warns(UserWarning):
        zf.writestr("m.dcm", b"one")
        zf.writestr("m.dcm", b"two")
    with pytest.raises(ArchiveError, match="two members named 'm.dcm'"):
        read_index(path)


@pytest.mark.parametrize(
    "members, expect",
    [(None, ""), ("", ""), ("a", "a/"), ("a/", "a/"), ("/a/b/", "a/b/")],
)
def test_members_prefix_is_a_folder(members: str | None, expect: str) -> None:
    assert members_prefix(members) == expect


SOURCE_FILES = {
    "train/p1.dcm": PREAMBLE_FILE,
    "train/p2.DCM": b"named .dcm, so an input without being opened",
    "train/sub/1.2.826.0.1.3680043.8.498.1": PREAMBLE_FILE,  # found by its preamble
    "train/notes.txt": b"no preamble",
    "train/.hidden.dcm": PREAMBLE_FILE,
    "train/.cache/p9.dcm": PREAMBLE_FILE,
    "test/p3.dcm": PREAMBLE_FILE,
    "labels.csv": b"patientId,x,y,width,height,Target\n",
    "__MACOSX/train/._p1.dcm": PREAMBLE_FILE,  # what a Mac's zip adds: hidden, so no input
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(
    "members, inputs, ignored",
    [
        ("train/", ["train/p1.dcm", "train/p2.DCM", "train/sub/1.2.826.0.1.3680043.8.498.1"], 1),
        ("train", ["train/p1.dcm", "train/p2.DCM", "train/sub/1.2.826.0.1.3680043.8.498.1"], 1),
        (None, ["test/p3.dcm", "train/p1.dcm", "train/p2.DCM", "train/sub/1.2.826.0.1.3680043.8.498.1"], 2),
        ("tra", [], 0),
        ("nothing/", [], 0),
    ],
    ids=["folder", "folder-without-slash", "whole-archive", "prefix-is-not-a-name-prefix", "no-such-folder"],
)
def test_archive_inputs_are_found_as_in_a_folder(tmp_path: Path, kind: str, members: str | None, inputs: list[str], ignored: int) -> None:
    path = _archive(tmp_path, kind, SOURCE_FILES)
    found = discover_archive(path, members)
    assert [rel for rel, _ in found.inputs] == inputs
    assert [size for _, size in found.inputs] == [len(SOURCE_FILES[rel]) for rel in inputs]
    assert found.ignored == ignored
    assert found.archive is not None and sorted(found.archive.members) == inputs

    folder = tmp_path / "unpacked"
    for rel, data in SOURCE_FILES.items():
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        (folder / rel).write_bytes(data)
    unpacked = discover(folder / members_prefix(members)) if members is not None and inputs else discover(folder)
    if inputs:
        prefix = members_prefix(members)
        assert [(prefix + rel, size) for rel, size in unpacked.inputs] == found.inputs
        assert unpacked.ignored == found.ignored


def test_is_archive_needs_a_zip_or_tar_file(tmp_path: Path) -> None:
    (tmp_path / "d.zip").mkdir()
    (tmp_path / "f.zip").write_bytes(b"")
    (tmp_path / "f.TAR").write_bytes(b"")
    (tmp_path / "f.tgz").write_bytes(b"")
    assert [is_archive(tmp_path / n) for n in ("d.zip", "f.zip", "f.TAR", "f.tgz", "missing.zip")] == [
        False, True, True, False, False,
    ]


@pytest.mark.parametrize("kind", ["zip-deflated", "tar"])
def test_an_archive_changed_since_its_index_was_read_is_refused(tmp_path: Path, kind: str) -> None:
    path = _archive(tmp_path, kind, {"a.dcm": PAYLOAD, "b.dcm": b"b"})
    index = read_index(path)
    _archive(tmp_path, kind, {"0.dcm": b"shifts every offset", "a.dcm": PAYLOAD, "b.dcm": b"b"})
    with pytest.raises(OSError, match="has changed since its member index was read"):
        ArchiveReader(index)


@pytest.mark.parametrize("kind", KINDS)
def test_read_member_by_name(tmp_path: Path, kind: str) -> None:
    path = _archive(tmp_path, kind, {"d/m.dcm": PAYLOAD})
    assert read_member(path, "d/m.dcm") == PAYLOAD
    with pytest.raises(FileNotFoundError, match="holds no member 'd/x.dcm'"):
        read_member(path, "d/x.dcm")


def test_a_hard_link_in_a_tar_is_a_member_of_its_own(tmp_path: Path) -> None:
    path = tmp_path / "a.tar"
    with tarfile.open(path, "w") as tf:
        info = tarfile.TarInfo("d/p1.dcm")
        info.size = len(PAYLOAD)
        tf.addfile(info, io.BytesIO(PAYLOAD))
        link = tarfile.TarInfo("d/p2.dcm")
        link.type, link.linkname = tarfile.LNKTYPE, "d/p1.dcm"
        tf.addfile(link)
    found = discover_archive(path, "d")
    assert found.inputs == [("d/p1.dcm", len(PAYLOAD)), ("d/p2.dcm", len(PAYLOAD))]
    with ArchiveReader(found.archive) as reader:
        assert reader.read(found.archive.members["d/p2.dcm"]) == PAYLOAD


@pytest.mark.parametrize(
    "names, expect",
    [(["a/x.dcm", "a/b/y.dcm", "c/z", "top.csv"], ["a/", "c/"]), (["top.csv"], [])],
    ids=["folders", "none"],
)
def test_top_folders_are_what_members_can_name(tmp_path: Path, names: list[str], expect: list[str]) -> None:
    assert top_folders(read_index(_zip(tmp_path / "a.zip", {n: b"x" for n in names}))) == expect
