"""The corruption matrix: a damaged shard is refused, naming it, on the loader's read path,
whatever the damage, the number of loader workers, where the shards are read from, and when
the read happens (an epoch's start, a mid-epoch resume, a second epoch after a clean first).

Each damage touches every sample of one shard that the read needs, so that any read of the
shard meets it; where a damage lands is found with :mod:`tarfile`, from outside the reader.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

import shards.store
from shards.cache import ShardFetchError
from shards.manifest import SHARDS_DIR, ShardInfo, read_manifest
from shards.origin import ShardOrigin, open_origin
from shards.reader import ShardChecksumError
from train.data import ShardLoader, read_split

ROOT = Path(__file__).resolve().parents[1]
BATCH, LANES = 4, 2


def _members(raw: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return tar.getmembers()


def flip_image(raw: bytearray, other: bytes) -> None:
    """One pixel byte of every image."""
    for m in _members(bytes(raw)):
        if m.name.endswith(".npy"):
            raw[m.offset_data + m.size - 7] ^= 0x01


def flip_json(raw: bytearray, other: bytes) -> None:
    """One byte of every JSON, chosen so that it is still valid JSON (``"`` and ``:`` left alone)."""
    for m in _members(bytes(raw)):
        if m.name.endswith(".json"):
            at = next(i for i in range(m.offset_data + m.size // 2, m.offset_data + m.size)
                      if chr(raw[i]).isdigit())
            raw[at] ^= 0x01  # one digit for another


def flip_tar_header(raw: bytearray, other: bytes) -> None:
    """A byte of every member's mtime field: nothing in a shard reader uses its value."""
    for m in _members(bytes(raw)):
        raw[m.offset + 140] ^= 0x01


def truncate(raw: bytearray, other: bytes) -> None:
    del raw[len(raw) // 2:]


def swap(raw: bytearray, other: bytes) -> None:
    """Another shard's bytes under this one's name."""
    raw[:] = other


DAMAGES = {"image byte": flip_image, "json byte": flip_json, "tar header byte": flip_tar_header,
           "truncated": truncate, "swapped": swap}
ORIGINS = ("local folder", "node cache", "remote URL")
WHEN = ("epoch start", "mid-epoch resume", "second epoch")


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory):
    """nginx over an empty folder the tests put damaged datasets in."""
    root = tmp_path_factory.mktemp("served-damaged")
    state = tmp_path_factory.mktemp("nginx-damaged-state")
    done = subprocess.run([sys.executable, "-m", "tools.serve", "http", str(root), "--detach", "--state",
                           str(state), "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    if done.returncode != 0:
        pytest.skip(done.stderr.strip())
    import json

    try:
        yield root, json.loads(done.stdout)["url"]
    finally:
        subprocess.run([sys.executable, "-m", "tools.serve", "stop", "--state", str(state)], cwd=ROOT, timeout=60)


def _target(data: Path, first_step: int) -> tuple[ShardInfo, ShardInfo]:
    """The train shard that the read from ``first_step`` needs last, and another one of
    another content."""
    manifest = read_manifest(data)
    info = read_split(data, "train")
    loader = ShardLoader(info, rank=0, world=1, global_batch=BATCH, lanes=LANES, seed=5)
    ids, _ = loader.plan(1 if first_step is None else 0).batches()
    last = int(ids[-1][0])
    k = max(i for i, base in enumerate(info.shard_base) if base <= last)
    target = info.shards[k]
    other = next(s for s in manifest.shards_of("train") if s.name != target.name and s.samples)
    return target, other


def _origin(kind: str, data: Path, tmp: Path, url: str | None) -> ShardOrigin:
    if kind == "local folder":
        return open_origin(data)
    if kind == "node cache":
        return open_origin(data, cache_dir=tmp / "cache")
    return open_origin(url, cache_dir=tmp / "cache")


def _damage(data: Path, origin: ShardOrigin, target: ShardInfo, other: ShardInfo,
            damage: Callable[[bytearray, bytes], None]) -> None:
    """Damage the shard where it is served and any copy a cache holds of it."""
    paths = [data / SHARDS_DIR / target.name]
    if origin.cache is not None and origin.cache.path_of(target).exists():
        paths.append(origin.cache.path_of(target))
    for path in paths:
        raw = bytearray(path.read_bytes())
        damage(raw, (data / SHARDS_DIR / other.name).read_bytes())
        path.write_bytes(bytes(raw))


# (moment, loader workers, reader threads): 0 workers at every moment; 2 workers in the second
# epoch only (each such run starts two processes); 2 reader threads from the epoch's start.
MOMENTS = [(when, 0, 0) for when in WHEN] + [("second epoch", 2, 0), ("epoch start", 0, 2)]


@pytest.mark.parametrize(("when", "workers", "threads"), MOMENTS,
                         ids=[f"{w}-{n}" + (f"-{t} threads" if t else "") for w, n, t in MOMENTS])
@pytest.mark.parametrize("kind", ORIGINS)
@pytest.mark.parametrize("damage", DAMAGES.values(), ids=DAMAGES.keys())
def test_a_damaged_shard_is_refused_naming_it(ingested_small, served, tmp_path, monkeypatch, damage, kind, when,
                                             workers, threads):
    monkeypatch.setattr(shards.store, "BACKOFF_S", (0.0,))  # a short copy is retried as a dropped connection
    root, base_url = served
    data = root / tmp_path.name / "ds"
    shutil.copytree(ingested_small, data)
    origin = _origin(kind, data, tmp_path, f"{base_url}{tmp_path.name}/ds")
    loader = ShardLoader(read_split(origin, "train"), rank=0, world=1, global_batch=BATCH, lanes=LANES,
                         workers=workers, seed=5, threads=threads)
    first_step = loader.steps - 1 if when == "mid-epoch resume" else 0
    target, other = _target(data, None if when == "second epoch" else first_step)
    epoch = 0
    if when == "second epoch":
        assert len(list(loader.epoch(0))) == loader.steps  # clean; a cache now holds copies
        epoch = 1
    _damage(data, origin, target, other, damage)
    # A checksum error, a format error (a ValueError) or, for a copy that stays short
    # through every try, a fetch error; from a worker process, a RuntimeError quoting it.
    with pytest.raises((ShardChecksumError, ValueError, ShardFetchError, RuntimeError), match=re.escape(target.name)):
        for _ in loader.epoch(epoch, first_step=first_step):
            pass
