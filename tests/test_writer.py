"""The shard writer's writes past the page cache (``O_DIRECT``): the same bytes as ``tarfile``
across chunk boundaries, pages really left out of the page cache, the fallbacks for
filesystems that refuse the flag, and errors met by the write thread."""

from __future__ import annotations

import errno
import io
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from shards import writer as writer_mod
from shards.format import TAR_MODE, TAR_MTIME, encode_image, encode_meta
from shards.writer import DIRECT_CHUNK, ShardWriter
from tests.pagecache import cached

pytestmark = pytest.mark.skipif(not hasattr(os, "O_DIRECT"), reason="no O_DIRECT on this platform")


def _samples(n: int, seed: int = 0) -> list[tuple[str, np.ndarray, dict]]:
    """``n`` samples of odd sizes, so that members straddle the chunks at varying offsets."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        key = f"s{i:03d}"
        image = rng.integers(0, 256, (640, 600 + 7 * i), dtype=np.uint8)
        out.append((key, image, {"key": key, "note": "x" * (i * 37 % 500)}))
    return out


def _tarfile_bytes(samples: list[tuple[str, np.ndarray, dict]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for key, image, meta in samples:
            for name, data in ((f"{key}.npy", encode_image(image)), (f"{key}.json", encode_meta(meta))):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode, info.uid, info.gid, info.uname, info.gname = (
                    len(data), TAR_MTIME, TAR_MODE, 0, 0, "", "")
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _write(path: Path, samples: list[tuple[str, np.ndarray, dict]], durable: bool = True) -> ShardWriter:
    with ShardWriter(path, durable=durable) as w:
        for key, image, meta in samples:
            w.write(key, image, meta)
    return w


@pytest.mark.parametrize("n", [1, 11, 27])  # within one chunk, across two, across several
def test_direct_writes_are_tarfiles_bytes_across_chunks(tmp_path: Path, n: int) -> None:
    samples = _samples(n)
    expected = _tarfile_bytes(samples)
    assert n < 27 or len(expected) > 2 * DIRECT_CHUNK + 4096
    w = _write(tmp_path / "s.tar", samples)
    assert (tmp_path / "s.tar").read_bytes() == expected
    assert w.result is not None and w.result.bytes == len(expected)
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file was left behind"


def test_direct_writes_leave_the_shard_out_of_the_page_cache(tmp_path: Path) -> None:
    """The point of the direct writes: the pixels never pass through the page cache (so a
    worker pays neither the copy into fresh pages nor their write-back and drop). A buffered
    write of the same bytes leaves them cached, which shows that the probe can tell."""
    samples = _samples(3)
    _write(tmp_path / "direct.tar", samples)
    (tmp_path / "buffered.tar").write_bytes(_tarfile_bytes(samples))
    assert cached(tmp_path / "buffered.tar")
    assert not cached(tmp_path / "direct.tar")


def test_a_filesystem_that_refuses_o_direct_at_open_gets_a_buffered_file(tmp_path: Path, monkeypatch) -> None:
    """Where ``open`` refuses the flag (``EINVAL``: FUSE, older tmpfs), the shard is written
    through the page cache, byte for byte the same. The refusal is the test's, from outside."""
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(writer_mod.os, "open", refusing_open)
    samples = _samples(11)
    _write(tmp_path / "s.tar", samples)
    assert (tmp_path / "s.tar").read_bytes() == _tarfile_bytes(samples)


def test_a_filesystem_that_refuses_o_direct_writes_gets_the_rest_buffered(tmp_path: Path, monkeypatch) -> None:
    """Where the flag is taken at ``open`` but each direct write is refused (``EINVAL``), the
    writer drops the flag and writes everything through the page cache, the same bytes."""
    import fcntl

    real_write = os.write

    def refusing_write(fd, data):
        if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_write(fd, data)

    monkeypatch.setattr(writer_mod.os, "write", refusing_write)
    samples = _samples(27)
    _write(tmp_path / "s.tar", samples, durable=False)
    writer_mod._FLUSHER._pending.join(timeout=30)
    assert (tmp_path / "s.tar").read_bytes() == _tarfile_bytes(samples)


def test_an_error_in_the_write_thread_reaches_the_caller_and_leaves_no_file(tmp_path: Path) -> None:
    """A write that fails in the write thread (here ``EFBIG``: a file-size limit set on the
    process from outside, like a full disk) is raised in the writer's thread, and neither
    the shard nor its temporary file is left."""
    script = textwrap.dedent(f"""
        import errno, resource, signal, sys
        from pathlib import Path
        import numpy as np
        from shards.writer import ShardWriter
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (6 << 20, 6 << 20))
        out = Path({str(tmp_path)!r})
        try:
            with ShardWriter(out / "s.tar") as w:
                for i in range(40):
                    w.write(f"k{{i}}", np.full((640, 640), i, np.uint8), {{"key": f"k{{i}}"}})
        except OSError as exc:
            print("raised", errno.errorcode[exc.errno], "after", i)
            sys.exit(0)
        sys.exit("no error")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("raised EFBIG after "), done.stdout
    assert int(done.stdout.split()[-1]) < 39, "the error came only at the close, not while writing"
    assert list(tmp_path.iterdir()) == []


def test_a_writer_that_cannot_map_its_chunks_leaves_neither_file_nor_descriptor(tmp_path: Path, monkeypatch) -> None:
    """Where the memory for the chunks cannot be had (the test refuses it from outside), the
    writer raises at once and leaves no temporary file and no open descriptor."""

    def no_memory() -> None:
        raise OSError(errno.ENOMEM, "Cannot allocate memory")

    monkeypatch.setattr(writer_mod._CHUNKS, "take", no_memory)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="Cannot allocate memory"):
        with ShardWriter(tmp_path / "s.tar"):
            pass
    assert list(tmp_path.iterdir()) == []
    assert len(os.listdir("/proc/self/fd")) == before
