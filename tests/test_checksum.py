"""Per-sample checksums (format 2) and the format-version policy: the writer's digests, the
manifest versions readers accept, :func:`shards.reader.read_into` over a table of ranges,
and a dataset of the previous version read as before."""

from __future__ import annotations

import dataclasses
import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import xxhash

from shards.format import FORMAT_VERSION, FormatError
from shards.manifest import SHARDS_DIR, Manifest, ShardInfo, read_manifest
from shards.reader import SampleChecksumError, ShardChecksumError, read_into
from shards.writer import ShardWriter
from train.data import ShardLoader, read_split

SIZE = 16


def _write(path: Path, n: int) -> tuple[ShardInfo, list[np.ndarray]]:
    rng = np.random.default_rng(n)
    images = [rng.integers(0, 256, (SIZE, SIZE), dtype=np.uint8) for _ in range(n)]
    with ShardWriter(path) as w:
        for i, image in enumerate(images):
            w.write(f"k{i}", image, {"key": f"k{i}", "target": i % 2, "note": "x" * (i * 97 % 700)})
    r = w.result
    assert r is not None
    return ShardInfo(name=path.name, split="train", samples=r.samples, bytes=r.bytes, sha256=r.sha256,
                     first_key=r.first_key, last_key=r.last_key, xxh3=r.xxh3), images


@pytest.mark.parametrize("n", [1, 5])
def test_the_writer_records_the_xxh3_of_each_members_data(tmp_path: Path, n: int):
    info, _ = _write(tmp_path / "s.tar", n)
    with tarfile.open(tmp_path / "s.tar") as tar:
        data = [tar.extractfile(m).read() for m in tar.getmembers()]  # type: ignore[union-attr]
    expected = [(xxhash.xxh3_128_hexdigest(a), xxhash.xxh3_128_hexdigest(b)) for a, b in zip(data[::2], data[1::2])]
    assert list(info.xxh3 or ()) == expected


def _manifest_dict(version, xxh3) -> dict:
    shard = {"name": "train-000000.tar", "split": "train", "samples": 1, "bytes": 10240, "sha256": "0" * 64,
             "first_key": "a", "last_key": "a"}
    if xxh3 is not None:
        shard["xxh3"] = xxh3
    return {"format_version": version, "params": {"size": 64}, "params_hash": "", "packages": {}, "source": {},
            "counts": {}, "shards": [shard]}


GOOD = [["a" * 32, "b" * 32]]


@pytest.mark.parametrize(("version", "xxh3", "error"), [
    (1, None, None),  # the previous version: no per-sample checksums
    (2, GOOD, None),
    (2, None, None),  # a format 1 shard kept by an append to a format 1 dataset
    (3, GOOD, None),  # QA flags
    (4, GOOD, None),  # the manifest names its dataset version (shards.versions)
    (5, GOOD, None),  # the source index appends read (shards.source_index)
    (6, GOOD, None),  # the current: a judged file reject carries its sha256
    (7, GOOD, "this reader reads versions 1 to 6 \\(the dataset was written by a newer pneumo-hpc: upgrade\\)"),
    (0, None, "format_version 0: this reader reads versions 1 to 6$"),
    ("2", GOOD, "format_version '2'"),
    (2, GOOD * 2, "2 per-sample checksums for 1 samples"),
    (2, [["a" * 31, "b" * 32]], "want 2 hex digests of 32 characters"),
], ids=["v1", "v2", "v2-shard-without", "v3", "v4", "v5", "v6", "newer", "zero", "string", "count", "digest-length"])
def test_readers_accept_every_version_up_to_the_current(version, xxh3, error):
    data = _manifest_dict(version, xxh3)
    if error is not None:
        with pytest.raises(FormatError, match=error):
            Manifest.from_dict(data)
        return
    m = Manifest.from_dict(data)
    assert m.shards[0].xxh3 == (None if xxh3 is None else tuple(map(tuple, xxh3)))
    assert Manifest.from_dict(json.loads(m.to_json())) == m  # the round trip keeps it


def test_the_ingest_writes_the_current_version_with_every_samples_checksums(ingested_small: Path):
    m = read_manifest(ingested_small)
    assert m.format_version == FORMAT_VERSION == 6 and m.version == 1
    assert all(s.xxh3 is not None and len(s.xxh3) == s.samples for s in m.shards)


# start, stop, kept (file positions whose pixels the caller keeps), yielded keys
READS = [
    (0, None, {0, 1, 2, 3, 4}, [0, 1, 2, 3, 4]),
    (1, 4, {1, 2, 3}, [1, 2, 3]),
    (2, None, {4}, [2, 3, 4]),  # pixels of 2 and 3 not kept: their JSON still checked and yielded
    (5, None, set(), []),
]


@pytest.mark.parametrize("format_1", [False, True], ids=["format 2", "format 1"])
@pytest.mark.parametrize(("start", "stop", "kept", "keys"), READS)
def test_read_into_puts_each_image_in_its_slot(tmp_path: Path, format_1, start, stop, kept, keys):
    info, images = _write(tmp_path / "s.tar", 5)
    if format_1:
        info = dataclasses.replace(info, xxh3=None)
    out = np.zeros((5, SIZE, SIZE), np.uint8)
    got = list(read_into(tmp_path / "s.tar", info, size=SIZE, start=start, stop=stop,
                         slot=lambda i: out[i] if i in kept else None))
    assert [s.index for s in got] == keys and [s.key for s in got] == [f"k{i}" for i in keys]
    for i in range(5):
        np.testing.assert_array_equal(out[i], images[i] if i in kept else 0)


def test_a_damaged_sample_is_refused_before_it_is_handed_out(tmp_path: Path):
    info, _ = _write(tmp_path / "s.tar", 5)
    raw = bytearray((tmp_path / "s.tar").read_bytes())
    with tarfile.open(fileobj=io.BytesIO(bytes(raw))) as tar:
        third = [m for m in tar.getmembers() if m.name == "k2.npy"][0]
    raw[third.offset_data + third.size - 1] ^= 0x80
    (tmp_path / "s.tar").write_bytes(bytes(raw))
    got = []
    out = np.zeros((SIZE, SIZE), np.uint8)
    with pytest.raises(SampleChecksumError, match=r"^shard s.tar: sample 2 \(k2.npy\): xxh3 .* does not match") as e:
        for s in read_into(tmp_path / "s.tar", info, size=SIZE, slot=lambda i: out):
            got.append(s.key)
    assert got == ["k0", "k1"]
    assert (e.value.index, e.value.key, e.value.member) == (2, "k2", "npy")


def test_a_dataset_of_the_previous_version_reads_as_before(ingested_small: Path, ingested_small_v1: Path,
                                                            tmp_path: Path):
    """Format 1 (no per-sample checksums): the same batches, and a damaged shard is refused
    by its sha256."""
    def epoch(data):
        loader = ShardLoader(read_split(data, "train"), rank=0, world=1, global_batch=4, lanes=2, seed=3)
        return [(b.keys, b.images.numpy().copy()) for b in loader.epoch(1)]

    v1, v2 = epoch(ingested_small_v1), epoch(ingested_small)
    assert [k for k, _ in v1] == [k for k, _ in v2]
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(v1, v2))
    data = tmp_path / "ds"
    shutil.copytree(ingested_small_v1, data)
    shard = read_manifest(data).shards_of("train")[0]
    raw = bytearray((data / SHARDS_DIR / shard.name).read_bytes())
    raw[2000] ^= 0x01
    (data / SHARDS_DIR / shard.name).write_bytes(bytes(raw))
    with pytest.raises(ShardChecksumError, match=f"/{shard.name}: sha256"):
        epoch(data)
