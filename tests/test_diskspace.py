"""A full disk or an exceeded quota: on a real small filesystem (a tmpfs), and errors injected at
close() and fsync(), where NFS and Lustre report a quota met when data is written back."""

from __future__ import annotations

import errno
import os
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import shards.writer as writer_module
from shards.atomic import atomic_write_bytes
from shards.diskspace import NoSpace, human, is_out_of_space, sample_bytes_at_least
from shards.format import encode_image
from shards.labels import read_labels
from shards.manifest import read_manifest, sha256_file
from shards.records import ShardRecord
from shards.writer import ShardWriter, wait_flushed
from tests.fault_injection import fault_env
from tests.smallfs import resize, tmpfs

REPO = Path(__file__).resolve().parents[1]
SIZE, SHARD = 32, 4
"""Images of 32 px in shards of 4: a shard is 20 kB (a whole tar record), a sample at least 2.5 kB."""


@pytest.fixture(scope="module")
def export(tmp_path_factory: pytest.TempPathFactory):
    from ingest.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth") / "rsna", 48, seed=1, size=64, progress=False)


def _ingest(export, out: Path, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "ingest", "--dicom-dir", str(export.images_dir), "--out", str(out),
           "--labels", str(export.labels_csv), "--size", str(SIZE), "--shard-size", str(SHARD),
           "--workers", "1", "--no-progress"]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def _error_line(res: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in res.stderr, res.stderr
    return res.stderr.strip().splitlines()[-1]


def test_full_disk_stops_at_once_and_resumes_byte_identical(export, tmp_path: Path) -> None:
    reference = tmp_path / "reference"
    assert _ingest(export, reference).returncode == 0
    n_shards = len(read_manifest(reference).shards)
    with tmpfs(tmp_path / "mnt", 160) as mnt:
        out = mnt / "out"
        res = _ingest(export, out)
        line = _error_line(res)
        assert res.returncode == 3, res.stderr
        assert line.startswith(f"error: no space left on the filesystem mounted at {mnt}; the ")
        assert f"of {n_shards} shards still to write need about " in line
        assert line.endswith("the mean shard so far); free space and run the same command to resume")
        assert "retry" not in res.stderr.lower()
        # Nothing that a resume would trust: each shard recorded done is whole, and no manifest.
        done = sorted((out / ".ingest" / "done").glob("*.json"))
        assert 0 < len(done) < n_shards and not (out / "manifest.json").exists()
        for path in done:
            rec = ShardRecord.from_json(json.loads(path.read_text()))
            assert sha256_file(out / "shards" / rec.name) == rec.info.sha256

        resize(mnt, 2048)
        res = _ingest(export, out)
        assert res.returncode == 0, res.stderr
        assert f"{len(done)} reused" in res.stdout
        assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == {
            p.name: p.read_bytes() for p in (reference / "shards").iterdir()
        }
        assert read_manifest(out).shards == read_manifest(reference).shards
        got, want = read_labels(out / "labels.zarr"), read_labels(reference / "labels.zarr")
        assert all(np.array_equal(getattr(got, f), getattr(want, f)) for f in ("key", "target", "shard", "boxes"))


def test_a_plan_that_cannot_fit_is_refused_before_any_decoding(export, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", 64) as mnt:
        res = _ingest(export, mnt / "out")
        line = _error_line(res)
        need = human(48 * sample_bytes_at_least(SIZE))
        assert res.returncode == 2
        assert line.startswith(f"error: --out {mnt / 'out'}: ") and f"need at least {need}" in line
        assert "local Dask cluster" not in res.stderr  # nothing was decoded
        assert not any((mnt / "out" / "shards").iterdir())


def test_unwritable_out_is_a_usage_error(export, tmp_path: Path) -> None:
    with tmpfs(tmp_path / "mnt", 64, read_only=True) as mnt:
        res = _ingest(export, mnt / "out")
        line = _error_line(res)
        assert res.returncode == 2
        assert line == (f"error: --out {mnt / 'out'} cannot be written (Read-only file system); the 48 input "
                        f"files need at least {human(48 * sample_bytes_at_least(SIZE))} of shards")


# --------------------------------------------------------------------------- injected at close and fsync


def _quota(*_args: object) -> None:
    raise OSError(errno.EDQUOT, "Disk quota exceeded")


class _FailingClose:
    """A file that closes, then reports the quota met at write-back (as NFS does)."""

    def __init__(self, f) -> None:  # noqa: ANN001
        self._f = f

    def __getattr__(self, name: str):  # noqa: ANN204
        return getattr(self._f, name)

    def close(self) -> None:
        self._f.close()
        _quota()


def _write_one(path: Path, durable: bool) -> ShardWriter:
    image = np.zeros((SIZE, SIZE), np.uint8)
    with ShardWriter(path, durable=durable) as w:
        w.write("a", image, {"key": "a"})
    return w


@pytest.mark.parametrize(
    ("where", "durable"),
    [("fsync", True), ("close", True), ("close", False)],
    ids=["fsync", "close", "close-not-durable"],
)
def test_shard_writer_fails_on_an_error_at_close_or_fsync(tmp_path: Path, monkeypatch, where: str,
                                                          durable: bool) -> None:
    if where == "fsync":
        monkeypatch.setattr(writer_module.os, "fsync", _quota)
    else:
        real_open = writer_module._DirectFile.open
        monkeypatch.setattr(writer_module._DirectFile, "open", classmethod(lambda cls, p: _FailingClose(real_open(p))))
    with pytest.raises(OSError) as got:
        _write_one(tmp_path / "s.tar", durable)
    assert got.value.errno == errno.EDQUOT and is_out_of_space(got.value)
    assert list(tmp_path.iterdir()) == []  # no shard, no temporary file
    wait_flushed()


def test_a_failed_write_back_removes_the_shard_and_is_reported(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(writer_module.os, "fdatasync", _quota)
    w = _write_one(tmp_path / "a.tar", durable=False)  # written back later, by the flusher
    assert w.result is not None
    with pytest.raises(OSError) as got:
        wait_flushed()
    assert got.value.errno == errno.EDQUOT and got.value.filename == str(tmp_path / "a.tar")
    assert not (tmp_path / "a.tar").exists()  # its bytes may never have reached the disk
    wait_flushed()  # reported once

    _write_one(tmp_path / "b.tar", durable=False)
    with pytest.raises(OSError, match="quota"):  # the next shard hears of the one before it
        _write_one(tmp_path / "c.tar", durable=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.undo()
    wait_flushed()


@pytest.mark.parametrize("where", ["fsync", "close"])
def test_atomic_write_keeps_the_old_file_on_an_error_at_close_or_fsync(tmp_path: Path, monkeypatch, where: str) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"old")
    if where == "fsync":
        monkeypatch.setattr("shards.atomic.os.fsync", _quota)
    else:
        import builtins

        real_open = builtins.open
        monkeypatch.setattr("shards.atomic.open", lambda *a, **k: _FailingClose(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError, match="quota"):
        atomic_write_bytes(path, encode_image(np.zeros((2, 2), np.uint8)))
    assert path.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["f"]


def test_no_space_travels_back_from_a_task_as_a_value() -> None:
    exc = OSError(errno.ENOSPC, "No space left on device", "/x/y")
    back = NoSpace.of(exc).error()
    assert (back.errno, back.strerror, back.filename) == (errno.ENOSPC, "No space left on device", "/x/y")


# --------------------------------------------------------------------------- training checkpoints


def _train(data: Path, run: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train", "--data", str(data), "--out", str(run), "--amp", "none",
           "--image-size", "64", "--batch-size", "4", "--eval-batch-size", "4", "--workers", "0",
           "--epochs", "1", "--ckpt-every", "2", "--seed", "3", *extra]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_a_checkpoint_that_fails_to_write_keeps_the_last_good_one(ingested_small: Path, tmp_path: Path) -> None:
    # A checkpoint of the default classifier is 44 MB: 60 MB hold the one at step 2, not the one at step 4.
    with tmpfs(tmp_path / "mnt", 60 * 1024) as mnt:
        run = mnt / "run"
        res = _train(ingested_small, run)
        line = _error_line(res)
        assert res.returncode == 3, res.stderr
        assert "step-00000004 could not be written (rank 0: " in line
        assert line.endswith("the last good checkpoint step-00000002 is kept: free space, then run the same "
                             "command with --resume")
        assert (run / "checkpoints" / "latest").read_text() == "step-00000002\n"
        assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest", "step-00000002"]

        resize(mnt, 200 * 1024)
        res = _train(ingested_small, run, "--resume")
        assert res.returncode == 0, res.stderr[-3000:]
        assert "resumed from " + str(run / "checkpoints" / "step-00000002") in res.stderr
        assert (run / "checkpoints" / "latest").read_text() == "step-00000005\n" and (run / "model.pt").is_file()


def test_a_quota_met_at_write_back_stops_the_ingest_and_resumes_byte_identical(export, tmp_path: Path) -> None:
    reference, out = tmp_path / "reference", tmp_path / "out"
    assert _ingest(export, reference).returncode == 0
    # Every worker's write-back fails (as NFS reports EDQUOT at fsync or close), not its writes.
    res = _ingest(export, out, env={**fault_env(""), "PNEUMO_WRITEBACK": "EDQUOT"})
    line = _error_line(res)
    assert res.returncode == 3, res.stderr
    assert line.startswith("error: the disk quota on ") and "shards still to write need about" in line
    for path in (out / ".ingest" / "done").glob("*.json"):  # a shard not written back is not kept
        assert not (out / "shards" / ShardRecord.from_json(json.loads(path.read_text())).name).exists()
    res = _ingest(export, out)
    assert res.returncode == 0, res.stderr
    assert {p.name: p.read_bytes() for p in (out / "shards").iterdir()} == {
        p.name: p.read_bytes() for p in (reference / "shards").iterdir()
    }


@pytest.mark.parametrize(
    ("code", "returned"),
    [(errno.ENOSPC, True), (errno.EDQUOT, True), (errno.EIO, False)],
    ids=["ENOSPC", "EDQUOT", "EIO"],
)
def test_a_shard_task_returns_no_space_instead_of_raising(tmp_path: Path, monkeypatch, code: int,
                                                          returned: bool) -> None:
    """A task that raised would be retried by Dask (``retries=3``); a full disk is not transient."""
    import ingest.worker
    from ingest.plan import ShardTask

    class FullWriter:
        def __init__(self, path: Path, **_kwargs: object) -> None:
            self.path = path

        def __enter__(self) -> FullWriter:
            raise OSError(code, os.strerror(code), str(self.path))

        def __exit__(self, *_exc: object) -> None:
            return None

    monkeypatch.setattr(ingest.worker, "ShardWriter", FullWriter)
    task = ShardTask(name="train-000000.tar", split="train", index=0, samples=(), dicom_dir=str(tmp_path),
                     out=str(tmp_path), processing={})
    if returned:
        got = ingest.worker.abandon_shard(task, "d")
        assert isinstance(got, NoSpace) and got.errno == code and got.filename.endswith("train-000000.tar")
    else:
        with pytest.raises(OSError):
            ingest.worker.abandon_shard(task, "d")
