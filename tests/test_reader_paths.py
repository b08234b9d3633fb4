"""The reader's path for plain local files (``shards.reader._read_plain``) against its general
tar path (``_read_slots``): the same samples, pixels and errors, whatever byte is damaged, with
the compiled read loop (``shards._fastread``, runs of 2 and of 8 samples) and with its Python
twin (``_plain_run``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shards import _fastread, reader  # the project's install builds the loop: no skip
from shards.manifest import ShardInfo
from shards.tar import TarParser
from shards.writer import ShardWriter

SIZE = 16
N = 6
BIG = 3  # this sample's JSON does not fit the plain path's one read after the image


def _write(path: Path) -> ShardInfo:
    rng = np.random.default_rng(0)
    with ShardWriter(path) as w:
        for i in range(N):
            note = "x" * (5000 if i == BIG else i * 97)
            w.write(f"k{i}", rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8), {"key": f"k{i}", "note": note})
    r = w.result
    assert r is not None
    return ShardInfo(name=path.name, split="train", samples=r.samples, bytes=r.bytes, sha256=r.sha256,
                     first_key=r.first_key, last_key=r.last_key, xxh3=r.xxh3)


RUNS = [
    pytest.param((_fastread.read_run, 8), id="c"),
    pytest.param((_fastread.read_run, 2), id="c-runs-of-2"),
    pytest.param((reader._plain_run, 8), id="python"),
]


@pytest.fixture(params=RUNS)
def run(request, monkeypatch):
    """The plain path's read loop, and the samples it asks of each call."""
    loop, samples = request.param
    monkeypatch.setattr(reader, "RUN", samples)
    return loop


def _read(path: Path, info: ShardInfo, plain: bool, start: int, stop: int, kept: set[int],
          run: Any = None) -> tuple[Any, ...]:
    """What one path yields and raises, and the pixels it leaves in the slots."""
    out = np.zeros((N, SIZE, SIZE), np.uint8)
    got: list[tuple[int, str, dict[str, Any]]] = []
    error = None
    with open(path, "rb", buffering=0) as f:
        src = reader._FileSlots(f.fileno())
        args = (info.name, info, SIZE, lambda i: out[i] if i in kept else None, start, stop, stop == N)
        samples = reader._read_plain(src, *args, run=run) if plain else reader._read_slots(TarParser(src, info.name), *args)
        try:
            for s in samples:
                got.append((s.index, s.key, s.meta))
        except Exception as exc:  # compared between the two paths: type and message
            error = (type(exc).__name__, re.sub(r" at 0x[0-9a-f]+", "", str(exc)))  # numpy's ast messages
    # Pixels count only for the samples handed out: a refused sample's slot may hold anything.
    return got, error, [out[i].tobytes() for i, _, _ in got]


READS = [(0, N, set(range(N))), (1, 4, {1, 3}), (2, 3, set())]


def test_an_intact_shard_reads_on_the_plain_path_to_its_end(tmp_path: Path, monkeypatch, run):
    info = _write(tmp_path / "s.tar")
    handed_over: list[int] = []
    general = reader._read_slots

    def spy(*args, **kwargs):
        handed_over.append(args[-1] if len(args) > 8 else kwargs.get("index", 0))
        return general(*args, **kwargs)

    monkeypatch.setattr(reader, "_read_slots", spy)
    got, error, _ = _read(tmp_path / "s.tar", info, True, 0, N, set(range(N)), run)
    assert error is None and [k for _, k, _ in got] == [f"k{i}" for i in range(N)]
    assert handed_over == [N]  # only the end-of-archive marker is left to the general reader


@pytest.mark.parametrize(("start", "stop", "kept"), READS)
def test_every_damaged_byte_gives_what_the_general_reader_gives(tmp_path: Path, start, stop, kept, run):
    path = tmp_path / "s.tar"
    info = _write(path)
    clean = path.read_bytes()
    assert _read(path, info, True, start, stop, kept, run) == _read(path, info, False, start, stop, kept)
    # Every byte of the first sample's image member and the JSON header after it, every 13th elsewhere.
    first = range(0, 3 * 512)
    rest = range(3 * 512, len(clean), 13)
    for at in sorted({*first, *rest}):
        raw = bytearray(clean)
        raw[at] ^= 0x41
        path.write_bytes(bytes(raw))
        assert _read(path, info, True, start, stop, kept, run) == _read(path, info, False, start, stop, kept), at
    for size in range(0, len(clean), 97):  # cut short anywhere
        path.write_bytes(clean[:size])
        assert _read(path, info, True, start, stop, kept, run) == _read(path, info, False, start, stop, kept), size


def test_the_loader_reads_with_the_compiled_loop():
    """The project's install builds ``shards._fastread`` (setup.py); a reader that fell back to
    the Python loop would read a fifth slower and say nothing."""
    assert reader._fastread is _fastread


def test_a_json_member_larger_than_the_file_is_the_general_readers_to_judge(tmp_path: Path, run):
    """A well-formed header (its tar checksum right) whose JSON would run 8 GiB past the end
    of the file: neither loop allocates for it, and the error is the general reader's."""
    from shards.format import npy_header_bytes
    from shards.tar import padded
    from shards.writer import member_header

    path = tmp_path / "s.tar"
    info = _write(path)
    raw = bytearray(path.read_bytes())
    at = 512 + padded(len(npy_header_bytes((SIZE, SIZE))) + SIZE * SIZE)  # sample 0's JSON header
    raw[at : at + 512] = member_header("k0.json", 8**11 - 1)
    path.write_bytes(bytes(raw))
    plain = _read(path, info, True, 0, N, set(range(N)), run)
    assert plain == _read(path, info, False, 0, N, set(range(N)))
    assert plain[0] == [] and plain[1] is not None
