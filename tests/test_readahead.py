"""ingest.readahead: a shard's files come in plan order, each read before its turn, and a
failed or hanging read costs only its own file, at its own turn."""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path

import pytest

from ingest.readahead import ReadAhead


def _files(root: Path, n: int) -> list[str]:
    for i in range(n):
        (root / f"{i}.dcm").write_bytes(bytes([i]) * (i + 1))
    return [f"{i}.dcm" for i in range(n)]


@pytest.mark.parametrize("depth,threads", [(1, 1), (4, 2), (16, 8)])
def test_bytes_come_in_plan_order(tmp_path: Path, depth: int, threads: int) -> None:
    names = _files(tmp_path, 10)
    with ReadAhead(tmp_path, names, depth=depth, threads=threads) as files:
        assert [files.next(n) for n in names] == [(tmp_path / n).read_bytes() for n in names]


def test_a_failed_read_raises_at_its_turn_only(tmp_path: Path) -> None:
    names = _files(tmp_path, 4)
    (tmp_path / names[1]).unlink()
    with ReadAhead(tmp_path, names) as files:
        assert files.next(names[0]) == b"\0"
        with pytest.raises(FileNotFoundError):
            files.next(names[1])
        assert files.next(names[2]) == b"\2" * 3
        assert files.next(names[3]) == b"\3" * 4


def test_the_next_file_is_opened_before_it_is_asked_for(tmp_path: Path) -> None:
    """File 1 is a FIFO: a writer can open it only once a reader has, so opening it while the
    caller has asked for nothing proves the read ahead; file 0 and file 2 do not wait on it."""
    names = _files(tmp_path, 3)
    fifo = tmp_path / names[1]
    fifo.unlink()
    os.mkfifo(fifo)
    with ReadAhead(tmp_path, names, depth=3, threads=2) as files:
        deadline = time.monotonic() + 10
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:  # ENXIO: no reader yet
                assert exc.errno == errno.ENXIO and time.monotonic() < deadline, "file 1 was never opened ahead"
                time.sleep(0.01)
        assert files.next(names[0]) == b"\0"
        os.write(fd, b"fifo")
        os.close(fd)
        assert files.next(names[1]) == b"fifo"
        assert files.next(names[2]) == b"\2" * 3


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
    with pytest.raises(ValueError, match="got 0 and 2"):
        ReadAhead(tmp_path, [], depth=0)
