"""ingest.readahead: a shard's files come in plan order, the next few are in the page cache
before they are asked for (and no more than those), and a failed or hanging hint or read
costs only its own file, at its own turn."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest

from ingest.readahead import ReadAhead
from tests.pagecache import cached, evict


def _files(root: Path, n: int, size: int = 1) -> list[str]:
    for i in range(n):
        (root / f"{i}.dcm").write_bytes(bytes([i]) * (i + size))
    return [f"{i}.dcm" for i in range(n)]


@pytest.mark.parametrize("depth", [2, 3, 8, 16])
def test_bytes_come_in_plan_order(tmp_path: Path, depth: int) -> None:
    names = _files(tmp_path, 10)
    with ReadAhead(tmp_path, names, depth=depth) as files:
        assert [files.next(n) for n in names] == [(tmp_path / n).read_bytes() for n in names]


def _wait_cached(paths: list[Path]) -> None:
    deadline = time.monotonic() + 10
    while not all(cached(p) for p in paths):
        assert time.monotonic() < deadline, f"never read ahead: {[p.name for p in paths if not cached(p)]}"
        time.sleep(0.01)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_the_next_files_are_in_the_page_cache_before_they_are_asked_for(tmp_path: Path) -> None:
    """The whole point: files ``depth`` ahead of the caller are read into the page cache by the
    time the caller gets to them, and files further ahead are left alone (each shard holds at
    most ``depth`` files' worth of pages it asked for)."""
    names = _files(tmp_path, 12, size=64 << 10)
    paths = [tmp_path / n for n in names]
    if not all(evict(p) for p in paths):
        pytest.skip("this filesystem keeps its files in memory: nothing to read ahead")
    with ReadAhead(tmp_path, names, depth=4) as files:
        _wait_cached(paths[:4])  # asked for nothing yet
        time.sleep(0.2)
        assert not any(cached(p) for p in paths[4:]), "read further ahead than the depth"
        for n in names[:2]:
            files.next(n)
        _wait_cached(paths[4:6])  # two taken: two more asked for
        time.sleep(0.2)
        assert not any(cached(p) for p in paths[6:]), "read further ahead than the depth"
        assert [files.next(n) for n in names[2:]] == [p.read_bytes() for p in paths[2:]]


def test_a_failed_read_raises_at_its_turn_only(tmp_path: Path) -> None:
    names = _files(tmp_path, 4)
    (tmp_path / names[1]).unlink()
    with ReadAhead(tmp_path, names) as files:
        assert files.next(names[0]) == b"\0"
        with pytest.raises(FileNotFoundError):
            files.next(names[1])
        assert files.next(names[2]) == b"\2" * 3
        assert files.next(names[3]) == b"\3" * 4


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise on this platform")
def test_a_hint_that_hangs_holds_up_no_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file whose hint never returns (a hung network mount, injected here by the test) is
    still read at its turn, as are the files after it: the hints only ever help."""
    names = _files(tmp_path, 10)
    hung, release = threading.Event(), threading.Event()
    real = os.posix_fadvise

    def fadvise(fd: int, offset: int, length: int, advice: int) -> None:
        if os.fstat(fd).st_size == 2:  # file 1
            hung.set()
            release.wait(30)
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", fadvise)
    try:
        with ReadAhead(tmp_path, names, depth=2) as files:
            assert hung.wait(10)
            assert [files.next(n) for n in names] == [(tmp_path / n).read_bytes() for n in names]
    finally:
        release.set()


def test_asking_out_of_order_is_a_bug(tmp_path: Path) -> None:
    names = _files(tmp_path, 2)
    with ReadAhead(tmp_path, names) as files:
        with pytest.raises(LookupError, match="out of order"):
            files.next(names[1])
    with ReadAhead(tmp_path, names[:1]) as files:
        files.next(names[0])
        with pytest.raises(LookupError, match="more files than were listed"):
            files.next(names[1])


def test_bad_settings_name_the_values(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="got 1"):
        ReadAhead(tmp_path, [], depth=1)
