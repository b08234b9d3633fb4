"""``shards.atomic``: a write that fails anywhere (while writing, at close, at fsync, on a full
filesystem, inside the caller's block) leaves the old file or folder and no temporary name."""

from __future__ import annotations

import builtins
import errno
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shards import atomic
from shards.atomic import atomic_dir, atomic_path, atomic_write, atomic_write_bytes, atomic_write_text

OLD = b"old content\n"


def _leftovers(folder: Path) -> list[str]:
    """Names in ``folder`` other than the target's own."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


class _Failing:
    """A file object that raises ``OSError(code)`` at ``where`` ("write" or "close"), after
    really closing the file it wraps (as a full NFS quota reported at close does)."""

    def __init__(self, f, where: str, code: int) -> None:
        self._f, self._where, self._code = f, where, code

    def _fail(self) -> None:
        raise OSError(self._code, os.strerror(self._code))

    def write(self, data):
        if self._where == "write":
            self._fail()
        return self._f.write(data)

    def close(self) -> None:
        self._f.close()
        if self._where == "close":
            self._fail()

    def __getattr__(self, name):
        return getattr(self._f, name)


def _failing_open(where: str, code: int) -> Callable:
    def fake_open(*args, **kwargs):
        return _Failing(builtins.open(*args, **kwargs), where, code)
    return fake_open


def _then_raise(_done: object, exc: BaseException) -> None:
    """Raise ``exc`` (the first argument is the step that ran before it)."""
    raise exc


@pytest.fixture
def target(tmp_path: Path) -> Path:
    path = tmp_path / "file.json"
    path.write_bytes(OLD)
    return path


@pytest.mark.parametrize("write", [
    pytest.param(lambda p: atomic_write_bytes(p, b"new"), id="bytes"),
    pytest.param(lambda p: atomic_write_text(p, "new"), id="text"),
    pytest.param(lambda p: atomic_write_bytes(p, b"new", durable=False), id="bytes-not-durable"),
])
@pytest.mark.parametrize("where, code", [
    ("write", errno.ENOSPC),
    ("close", errno.EDQUOT),
])
def test_failure_keeps_old_file_and_leaves_no_temporary(target: Path, monkeypatch, write, where, code) -> None:
    monkeypatch.setattr(atomic, "open", _failing_open(where, code), raising=False)
    with pytest.raises(OSError) as info:
        write(target)
    assert info.value.errno == code
    assert target.read_bytes() == OLD
    assert _leftovers(target.parent) == []


def test_failure_at_fsync_keeps_old_file(target: Path, monkeypatch) -> None:
    def fsync(fd: int) -> None:
        raise OSError(errno.EIO, "fsync failed")
    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(OSError, match="fsync failed"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == OLD
    assert _leftovers(target.parent) == []


def test_exception_in_block_keeps_old_file(target: Path) -> None:
    with pytest.raises(KeyError):
        with atomic_write(target, "w") as f:
            f.write("half")
            raise KeyError("caller failed")
    assert target.read_bytes() == OLD
    assert _leftovers(target.parent) == []


@pytest.mark.parametrize("write, expected", [
    (lambda p: atomic_write_bytes(p, b"\x00new"), b"\x00new"),
    (lambda p: atomic_write_text(p, "new\n"), b"new\n"),
    (lambda p: atomic_write_bytes(p, b"new", durable=False), b"new"),
], ids=["bytes", "text", "not-durable"])
def test_success_replaces_file(target: Path, write, expected: bytes) -> None:
    write(target)
    assert target.read_bytes() == expected
    assert _leftovers(target.parent) == []


def test_bad_mode_is_refused(target: Path) -> None:
    with pytest.raises(ValueError, match="'a' is not 'w' or 'wb'"):
        with atomic_write(target, "a"):
            pass


@pytest.fixture
def full_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs (needs root to mount); unmounted on teardown."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(mnt)], capture_output=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {res.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=True)


@pytest.mark.parametrize("durable", [True, False])
def test_full_filesystem_keeps_old_file(full_fs: Path, durable: bool) -> None:
    path = full_fs / "file.bin"
    path.write_bytes(OLD)
    with pytest.raises(OSError) as info:
        atomic_write_bytes(path, b"x" * (2 << 20), durable=durable)
    assert info.value.errno == errno.ENOSPC
    assert path.read_bytes() == OLD
    assert _leftovers(full_fs) == []


# --------------------------------------------------------------------------- atomic_path


def test_atomic_path_renames_what_the_block_wrote(target: Path) -> None:
    with atomic_path(target, durable=False) as tmp:
        assert tmp.parent == target.parent and tmp.name.startswith(".")
        tmp.write_bytes(b"new")
        assert target.read_bytes() == OLD
    assert target.read_bytes() == b"new"
    assert _leftovers(target.parent) == []


@pytest.mark.parametrize("body, error", [
    pytest.param(lambda tmp: _then_raise(tmp.write_bytes(b"half"), ConnectionError("cut")),
                 ConnectionError, id="block-raises-after-writing"),
    pytest.param(lambda tmp: None, FileNotFoundError, id="block-writes-nothing"),
])
def test_atomic_path_failure_keeps_old_file(target: Path, body, error) -> None:
    with pytest.raises(error):
        with atomic_path(target) as tmp:
            body(tmp)
    assert target.read_bytes() == OLD
    assert _leftovers(target.parent) == []


# --------------------------------------------------------------------------- atomic_dir


def _make_folder(path: Path, content: str) -> None:
    path.mkdir()
    (path / "a").write_text(content)
    (path / "sub").mkdir()
    (path / "sub" / "b").write_text(content)


@pytest.mark.parametrize("existing", [True, False], ids=["replaces", "creates"])
def test_atomic_dir_puts_the_new_folder_in_place(tmp_path: Path, existing: bool) -> None:
    path = tmp_path / "labels.zarr"
    if existing:
        _make_folder(path, "old")
        (path / "only-in-old").write_text("x")
    with atomic_dir(path) as tmp:
        _make_folder(tmp, "new")
        if existing:
            assert (path / "a").read_text() == "old"
    assert (path / "a").read_text() == "new" and (path / "sub" / "b").read_text() == "new"
    assert not (path / "only-in-old").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("body, error", [
    pytest.param(lambda tmp: _then_raise(_make_folder(tmp, "half"), OSError(errno.ENOSPC, "full")),
                 OSError, id="block-raises-after-writing"),
    pytest.param(lambda tmp: None, FileNotFoundError, id="block-makes-nothing"),
])
def test_atomic_dir_failure_keeps_old_folder(tmp_path: Path, body, error) -> None:
    path = tmp_path / "labels.zarr"
    _make_folder(path, "old")
    with pytest.raises(error):
        with atomic_dir(path) as tmp:
            body(tmp)
    assert (path / "a").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_rename_failure_restores_old_folder(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "labels.zarr"
    _make_folder(path, "old")
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name.startswith(".labels.zarr.tmp-"):
            raise OSError(errno.EIO, "rename failed")
        return real_replace(src, dst)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        with atomic_dir(path) as tmp:
            _make_folder(tmp, "new")
    assert (path / "a").read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_dir_removes_a_killed_writers_temporaries(tmp_path: Path) -> None:
    path = tmp_path / "labels.zarr"
    _make_folder(tmp_path / ".labels.zarr.tmp-999999-1", "killed")
    _make_folder(tmp_path / ".labels.zarr.old-999999-1", "killed")
    _make_folder(tmp_path / ".other.zarr.tmp-999999-1", "someone else's")
    with atomic_dir(path) as tmp:
        _make_folder(tmp, "new")
    assert _leftovers(tmp_path) == [".other.zarr.tmp-999999-1"]
