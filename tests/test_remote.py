"""Datasets at URLs: real servers on loopback (nginx over HTTP, rclone's S3), the shard cache.

The servers are started by the project's own command (``python -m tools.serve``, the one
users run), once per session; the dropped-connection server is a separate process too
(``tests/servers/dropping_http.py``: it drops every try at a known byte, so the tries can be
counted).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import shards.cache
import shards.store
from shards.cache import CacheFullError, ShardCache, ShardFetchError
from shards.local_copy import local_copy
from shards.origin import open_origin
from shards.manifest import SHARDS_DIR, read_manifest
from shards.reader import ShardChecksumError
from tools.serve import free_port
from shards.store import DatasetNotFoundError, normalize_location, open_store, read_manifest_from, redact_url

ROOT = Path(__file__).resolve().parents[1]


def _serve(kind: str, root: Path, state: Path) -> dict:
    done = subprocess.run([sys.executable, "-m", "tools.serve", kind, str(root), "--detach", "--state", str(state),
                           "--json"], capture_output=True, text=True, cwd=ROOT, timeout=300)
    if done.returncode != 0:
        if "run as root" in done.stderr or "no rclone binary" in done.stderr:
            pytest.skip(done.stderr.strip())
        raise RuntimeError(f"python -m tools.serve {kind} failed: {done.stderr}")
    return json.loads(done.stdout)


@pytest.fixture(scope="session")
def served_root(ingested_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ROOT/bkt/ds``: a copy of the small dataset; ``ROOT/bkt/bad``: one shard altered."""
    root = tmp_path_factory.mktemp("served")
    shutil.copytree(ingested_small, root / "bkt" / "ds")
    shutil.copytree(ingested_small, root / "bkt" / "bad")
    first = read_manifest(ingested_small).shards[0].name
    with open(root / "bkt" / "bad" / SHARDS_DIR / first, "r+b") as f:
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 0xFF]))
    return root


def _running(kind: str, root: Path, state: Path):
    """A ``tools.serve`` server of ``kind`` over ``root`` for the fixture's lifetime."""
    yield _serve(kind, root, state)
    subprocess.run([sys.executable, "-m", "tools.serve", "stop", "--state", str(state)], cwd=ROOT, timeout=60)


@pytest.fixture(scope="session")
def nginx(served_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """nginx serving ``served_root`` (installed from Debian by ``tools.serve`` if missing)."""
    yield from _running("http", served_root, tmp_path_factory.mktemp("nginx-state"))


@pytest.fixture(scope="session")
def s3_server(served_root: Path, tmp_path_factory: pytest.TempPathFactory):
    """``rclone serve s3`` over ``served_root`` (bucket ``bkt``)."""
    yield from _running("s3", served_root, tmp_path_factory.mktemp("s3-state"))


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    for k, v in s3_server["env"].items():
        monkeypatch.setenv(k, v)
    import fsspec

    fsspec.filesystem("s3").clear_instance_cache()  # credentials are read when an instance is made
    return s3_server


def _shard_gets(state: str) -> list[str]:
    log = Path(state) / "nginx" / "access.log"
    requests = [line.split('"')[1].split() for line in log.read_text().splitlines()]
    return [path for method, path, *_ in requests if method == "GET" and path.endswith(".tar")]


def _epoch(location, cache_dir=None, workers=0):
    from train.data import ShardLoader, read_split

    info = read_split(open_origin(location, cache_dir=cache_dir), "train")
    loader = ShardLoader(info, rank=0, world=1, global_batch=4, lanes=2, workers=workers)
    batches = list(loader.epoch(0))
    return [k for b in batches for k in b.keys], np.concatenate([b.images.numpy() for b in batches])


@pytest.mark.parametrize("url, shown", [
    ("https://alice:s3cret@host/data", "https://***@host/data"),
    ("s3://bucket/prefix?X-Amz-Signature=abc", "s3://bucket/prefix?***"),
    ("http://host:8080/ds", "http://host:8080/ds"),
    ("/plain/path", "/plain/path"),
])
def test_redact_url_hides_userinfo_and_query(url, shown):
    assert redact_url(url) == shown


@pytest.mark.parametrize("given, expected", [
    ("file:///data/ds", Path("/data/ds")), ("data/ds", Path("data/ds")),
    ("s3://bkt/ds/", "s3://bkt/ds"), ("HTTPS://h/ds", "HTTPS://h/ds"),
])
def test_normalize_location(given, expected):
    assert normalize_location(given) == expected


def test_unsupported_scheme_is_a_value_error():
    with pytest.raises(ValueError, match="unsupported URL scheme 'ftp'"):
        normalize_location("ftp://host/ds")


def test_http_loader_matches_local_and_warm_cache_fetches_nothing(nginx, ingested_small, tmp_path):
    keys, images = _epoch(ingested_small)
    url = nginx["url"] + "bkt/ds"
    before = len(_shard_gets(nginx["state"]))
    got_keys, got_images = _epoch(url, cache_dir=tmp_path / "cache", workers=2)
    assert got_keys == keys and np.array_equal(got_images, images)
    n_shards = len(read_manifest(ingested_small).shards_of("train"))
    assert len(_shard_gets(nginx["state"])) - before == n_shards  # each fetched once
    again_keys, _ = _epoch(url, cache_dir=tmp_path / "cache")
    assert again_keys == keys
    assert len(_shard_gets(nginx["state"])) - before == n_shards  # warm: served from the cache


def test_s3_loader_matches_local_and_verify_passes(s3_env, ingested_small, tmp_path, capsys):
    from shards.__main__ import main as shards_main

    keys, images = _epoch(ingested_small)
    got_keys, got_images = _epoch("s3://bkt/ds", cache_dir=tmp_path / "cache")
    assert got_keys == keys and np.array_equal(got_images, images)
    assert shards_main(["verify", "s3://bkt/ds", "--workers", "1", "--no-progress"]) == 0
    assert "verify quick: s3://bkt/ds:" in capsys.readouterr().out


def test_missing_url_is_a_one_line_error_with_exit_2(nginx, s3_env, capsys):
    from shards.__main__ import main as shards_main

    for url in (nginx["url"] + "bkt/nope", "s3://bkt/nope", "s3://no-such-bucket/ds"):
        with pytest.raises(DatasetNotFoundError, match="manifest.json: not found"):
            read_manifest_from(open_store(url))
        assert shards_main(["verify", url, "--workers", "1"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {url}/manifest.json: not found") and "\n" not in err


@pytest.mark.slow
def test_train_cli_exits_2_naming_the_missing_url(nginx, tmp_path):
    url = nginx["url"] + "bkt/nope"
    done = subprocess.run([sys.executable, "-m", "train", "--data", url, "--out", str(tmp_path / "run")],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2, done.stderr
    assert f"{url}/manifest.json: not found" in done.stderr


def test_served_shard_with_other_bytes_raises_checksum_error_naming_the_url(nginx, tmp_path):
    url = nginx["url"] + "bkt/bad"
    with pytest.raises(ShardChecksumError, match=f"shard {url}/shards/train-000000.tar: sha256"):
        _epoch(url, cache_dir=tmp_path / "cache")
    assert not list((tmp_path / "cache" / SHARDS_DIR).glob("*.tar")) or all(
        p.stat().st_size for p in (tmp_path / "cache" / SHARDS_DIR).glob("*.tar"))
    assert not list((tmp_path / "cache" / SHARDS_DIR).glob(".*tmp*"))  # nothing half-written left


def _flip(b: bytes) -> bytes:
    return b[:100] + bytes([b[100] ^ 1]) + b[101:]


@pytest.mark.parametrize("damage", [_flip, lambda b: b + b"\0", lambda b: b[:-1], lambda b: b""],
                         ids=["byte-flipped", "one-byte-longer", "one-byte-shorter", "empty"])
def test_damaged_cached_copy_is_rechecked_and_fetched_again(nginx, ingested_small, tmp_path, damage):
    """Copies are read into buffers that are not zeroed first: only the bytes that arrived
    count, so a copy cut short or grown by its end fails like one with a flipped byte."""
    url = nginx["url"] + "bkt/ds"
    store = open_store(url)
    shard = read_manifest(ingested_small).shards[0]
    cache = ShardCache(tmp_path / "cache")
    with cache.hold(store, shard) as path:
        good = path.read_bytes()
    path.write_bytes(damage(good))
    before = _shard_gets(nginx["state"]).count(f"/bkt/ds/shards/{shard.name}")
    with cache.hold(store, shard) as again:
        assert again.read_bytes() == good
    assert _shard_gets(nginx["state"]).count(f"/bkt/ds/shards/{shard.name}") == before + 1


def test_loader_never_yields_a_damaged_cached_copy(nginx, ingested_small, tmp_path):
    """A cached copy damaged in place (same size) is caught before any of its samples is
    yielded: the epoch equals the local one and the shard is fetched again."""
    keys, images = _epoch(ingested_small)
    url = nginx["url"] + "bkt/ds"
    cache = tmp_path / "cache"
    _epoch(url, cache_dir=cache)
    shard = read_manifest(ingested_small).shards_of("train")[0]
    copy = cache / SHARDS_DIR / f"{shard.sha256}.tar"
    with open(copy, "r+b") as f:  # flip a pixel byte of the first image
        f.seek(2000)
        byte = f.read(1)
        f.seek(2000)
        f.write(bytes([byte[0] ^ 0xFF]))
    before = _shard_gets(nginx["state"]).count(f"/bkt/ds/shards/{shard.name}")
    got_keys, got_images = _epoch(url, cache_dir=cache)
    assert got_keys == keys and np.array_equal(got_images, images)
    assert _shard_gets(nginx["state"]).count(f"/bkt/ds/shards/{shard.name}") == before + 1


class _CountingSha256:
    """Stands in for ``hashlib.sha256``: records every digest computed."""

    digests: list[str] = []

    def __init__(self, data=b"", real=hashlib.sha256) -> None:
        self._h = real(data)

    def update(self, data) -> None:
        self._h.update(data)

    def hexdigest(self) -> str:
        digest = self._h.hexdigest()
        type(self).digests.append(digest)
        return digest


def _digests_of_an_epoch(location, cache_dir, monkeypatch) -> Counter:
    seen: list[str] = []
    with monkeypatch.context() as m:
        m.setattr(_CountingSha256, "digests", seen)
        m.setattr(hashlib, "sha256", _CountingSha256)
        _epoch(location, cache_dir=cache_dir)
    return Counter(seen)


def test_each_shard_is_hashed_once_per_read_from_a_server_and_never_whole_locally(
        nginx, ingested_small, ingested_small_v1, tmp_path, monkeypatch):
    """From an HTTP server, cold or warm cache, each read of a shard is hashed whole once (the
    download's or the cached copy's check), as a format 1 shard read locally is (a shard split
    over two lanes is read twice). A format 2 shard read locally is never hashed whole: each
    sample is checked against its own checksums instead."""
    url, cache = nginx["url"] + "bkt/ds", tmp_path / "cache"
    train = {s.sha256 for s in read_manifest(ingested_small).shards_of("train")}

    def counts(location, cache_dir) -> Counter:
        return Counter({d: n for d, n in _digests_of_an_epoch(location, cache_dir, monkeypatch).items() if d in train})

    local_v1 = counts(ingested_small_v1, None)
    assert set(local_v1) == train
    assert counts(url, cache) == local_v1  # cold: the download's hash is the check
    assert counts(url, cache) == local_v1  # warm: the cache's re-check is the only hash
    assert counts(ingested_small, None) == Counter()


def test_lanes_fetching_one_shard_while_holding_it_never_wait_for_each_other(nginx, ingested_small, tmp_path):
    """Two lanes (threads here; ranks alike) ask for the same cold shard at once and each keeps
    holding it, as a lane does while its batch is assembled: both must get it. (Upgrading a
    shared hold to an exclusive fetch lock deadlocked here, and hung a CI run.)"""
    store = open_store(nginx["url"] + "bkt/ds")
    shard = read_manifest(ingested_small).shards_of("train")[0]
    cache = ShardCache(tmp_path / "cache")
    lanes = 3
    start = threading.Barrier(lanes)
    held: list[int] = []

    def lane() -> None:
        start.wait()
        fd, verified = cache.acquire(store, shard)
        held.append(fd)  # never released while the others fetch

    threads = [threading.Thread(target=lane, daemon=True) for _ in range(lanes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    try:
        assert len(held) == lanes, f"{lanes - len(held)} lane(s) still waiting for a shard the others hold"
        assert len(_shard_gets(nginx["state"])) >= 1
    finally:
        for fd in held:
            os.close(fd)

def test_every_lane_starts_fetching_before_the_first_batch(ingested_small, tmp_path, monkeypatch):
    """The first batch needs the first window of every lane: all lanes ask for their first
    shard at once. Here a fetch returns only once every lane has asked for its first shard, so
    lanes that started one after another (each once the previous one had its first window, as
    they once did) never get past the first fetch."""
    from train.data import ShardLoader, read_split

    info = read_split(open_origin(ingested_small, cache_dir=tmp_path / "cache"), "train")
    loader = ShardLoader(info, rank=0, world=1, global_batch=4, lanes=4, workers=0)
    firsts = {info.shards[lane.spans[0].shard].name for lane in loader.plan(0).lanes}
    asked: set[str] = set()
    all_asked = threading.Event()
    acquire = ShardCache.acquire

    def acquire_once_every_lane_asked(self, store, shard):
        asked.add(shard.name)
        if firsts <= asked:
            all_asked.set()
        if not all_asked.wait(timeout=20):
            raise TimeoutError(f"only the first shards {sorted(asked & firsts)} of {sorted(firsts)} were asked for")
        return acquire(self, store, shard)

    monkeypatch.setattr(ShardCache, "acquire", acquire_once_every_lane_asked)
    assert len(firsts) == 4
    assert sum(len(b) for b in loader.epoch(0)) >= info.samples


RANK_SCRIPT = """
import sys
from pathlib import Path
from shards.cache import ShardCache
from shards.manifest import read_manifest
from shards.store import open_store
store, cache = open_store(sys.argv[1]), ShardCache(Path(sys.argv[2]))
for shard in read_manifest(sys.argv[3]).shards:
    with cache.hold(store, shard):
        pass
"""


def test_ranks_on_a_node_share_the_cache_and_fetch_each_shard_once(nginx, ingested_small, tmp_path):
    url = nginx["url"] + "bkt/ds"
    before = _shard_gets(nginx["state"])
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", RANK_SCRIPT, url, str(tmp_path / "cache"), str(ingested_small)],
                              env=env) for _ in range(3)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0, 0]
    after = _shard_gets(nginx["state"])[len(before):]
    names = sorted(f"/bkt/ds/shards/{s.name}" for s in read_manifest(ingested_small).shards)
    assert sorted(after) == names  # three processes, every shard fetched exactly once


def test_lru_eviction_keeps_the_cache_under_its_limit(ingested_small, tmp_path):
    store = open_store(ingested_small)  # the cache works the same for a folder
    shards_ = read_manifest(ingested_small).shards
    limit = shards_[0].bytes + shards_[1].bytes
    cache = ShardCache(tmp_path / "cache", limit_bytes=limit)
    for s in shards_:
        with cache.hold(store, s):
            pass
    kept = sorted(p.name for p in (tmp_path / "cache" / SHARDS_DIR).glob("*.tar"))
    assert sum(p.stat().st_size for p in (tmp_path / "cache" / SHARDS_DIR).glob("*.tar")) <= limit
    assert f"{shards_[-1].sha256}.tar" in kept and f"{shards_[0].sha256}.tar" not in kept  # oldest went first


def test_a_held_shard_is_never_evicted(ingested_small, tmp_path):
    store = open_store(ingested_small)
    first, *rest = read_manifest(ingested_small).shards
    cache = ShardCache(tmp_path / "cache", limit_bytes=0)
    with cache.hold(store, first) as held:
        for s in rest:
            with cache.hold(store, s):
                pass
        assert held.exists()
    cache.evict(0)
    assert not held.exists()


@pytest.fixture
def dropping_server(served_root, tmp_path):
    def start(drop_first: int | None = None):
        log = tmp_path / f"requests-{drop_first}.log"
        cmd = [sys.executable, str(ROOT / "tests" / "servers" / "dropping_http.py"), str(served_root), "--log", str(log)]
        if drop_first is not None:
            cmd += ["--drop-first", str(drop_first)]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
        procs.append(proc)
        port = int(proc.stdout.readline())
        return f"http://127.0.0.1:{port}/bkt/ds", log

    procs: list[subprocess.Popen] = []
    yield start
    for p in procs:
        p.terminate()
        p.wait(timeout=10)


def test_connection_dropped_mid_shard_is_retried_then_reported(dropping_server, ingested_small, tmp_path,
                                                               monkeypatch):
    monkeypatch.setattr(shards.store, "BACKOFF_S", (0.0,))
    shard = read_manifest(ingested_small).shards[0]
    url, log = dropping_server()
    with pytest.raises(ShardFetchError, match=f"^{url}/shards/{shard.name}: {shards.cache.FETCH_ATTEMPTS} tries "
                                              "failed; the last: "):
        with ShardCache(tmp_path / "cache").hold(open_store(url), shard):
            pass
    assert log.read_text().count(f"/shards/{shard.name}") == shards.cache.FETCH_ATTEMPTS
    assert not list((tmp_path / "cache" / SHARDS_DIR).iterdir())  # no partial file left

    url, log = dropping_server(drop_first=1)  # one drop, then the server recovers
    with ShardCache(tmp_path / "cache").hold(open_store(url), shard) as path:
        assert path.stat().st_size == shard.bytes
    assert log.read_text().count(f"/shards/{shard.name}") == 2


def test_credentials_in_the_url_never_reach_logs_or_config(nginx, tmp_path, caplog, capsys):
    from shards.__main__ import main as shards_main
    from train.config import TrainConfig

    url = nginx["url"].replace("http://", "http://alice:s3cret@") + "bkt/ds"
    caplog.set_level("DEBUG")
    _epoch(url, cache_dir=tmp_path / "cache")
    assert shards_main(["verify", url, "--workers", "1", "--no-progress"]) == 0
    cfg = TrainConfig.from_dict({"data": {"path": url}, "out": str(tmp_path / "run")})
    text = caplog.text + "".join(capsys.readouterr()) + json.dumps(cfg.to_dict())
    assert "s3cret" not in text and "***@127.0.0.1" in text


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("mount"), reason="mounting a tmpfs needs root")
def test_full_cache_disk_is_a_clear_error(ingested_small, tmp_path):
    shard = max(read_manifest(ingested_small).shards, key=lambda s: s.bytes)
    mnt = Path(tempfile.mkdtemp(dir=tmp_path))
    size_kb = 16
    assert shard.bytes > size_kb * 1024
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        with pytest.raises(CacheFullError, match=f"cache {mnt}: no space left on the device while writing "
                                                 f".*{shard.name}"):
            with ShardCache(mnt).hold(open_store(ingested_small), shard):
                pass
        assert not list((mnt / SHARDS_DIR).iterdir())  # the partial file is gone
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_stats_and_local_copy_of_a_remote_dataset(nginx, capsys):
    from shards.__main__ import main as shards_main

    url = nginx["url"] + "bkt/ds"
    assert shards_main(["stats", url]) == 0
    assert f"dataset: {url}" in capsys.readouterr().out
    with local_copy(url, shards=False) as (folder, shown):
        assert shown == url and (folder / "manifest.json").is_file() and not (folder / SHARDS_DIR).exists()
    assert not folder.exists()


def test_prefetcher_releases_what_was_never_read(nginx, ingested_small, tmp_path):
    source = open_origin(nginx["url"] + "bkt/ds", cache_dir=tmp_path / "cache", cache_limit_gb=0)
    all_shards = read_manifest(ingested_small).shards
    pre = source.prefetcher(all_shards, depth=3)
    with pre.get(0) as got:
        assert got.sha256 == all_shards[0].sha256 and len(got.data) == all_shards[0].bytes
    pre.close()  # shards 1..3 were fetched ahead and never read: released, evictable
    assert source.cache is not None and source.cache.evict(0) == 0
    assert threading.active_count() < 50


@pytest.mark.slow
def test_two_ranks_train_from_http_through_one_cache_and_store_no_credentials(nginx, ingested_small, tmp_path):
    """torchrun, 2 ranks, --data with a password in the URL, one --cache-dir: the run ends,
    each shard was fetched once for the node, and no file of the run holds the password."""
    url = nginx["url"].replace("http://", "http://alice:s3cret@") + "bkt/ds"
    run, cache = tmp_path / "run", tmp_path / "cache"
    before = _shard_gets(nginx["state"])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "train", "--data", url, "--cache-dir", str(cache),
           "--cache-limit", "1", "--out", str(run), "--image-size", "32", "--batch-size", "4",
           "--eval-batch-size", "4", "--workers", "1", "--epochs", "1", "--amp", "none"]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    fetched = _shard_gets(nginx["state"])[len(before):]
    assert sorted(fetched) == sorted(set(fetched))  # the two ranks never fetched a shard twice
    assert "s3cret" not in done.stdout + done.stderr
    for f in run.rglob("*"):
        if f.is_file():
            assert b"s3cret" not in f.read_bytes(), f
    assert "http://***@127.0.0.1" in (run / "config.toml").read_text()


def test_versions_of_a_served_dataset(nginx, s3_env, served_root, ingested_small, tmp_path, capsys):
    """``URL@vN`` over HTTP and S3: the latest version reads like the folder, an unavailable one
    says why, ``versions`` lists them, and a node cache drops what a withdrawal deleted."""
    from shards.__main__ import main as shards_main
    from shards.labels import read_labels
    from shards.withdraw import withdraw

    local = served_root / "bkt" / "versioned"
    shutil.copytree(ingested_small, local)
    url, cache = nginx["url"] + "bkt/versioned", tmp_path / "cache"
    _epoch(url, cache_dir=cache)  # the cache now holds version 1's train shards
    first = read_manifest(local).shards[0]
    withdraw(local, [str(read_labels(local / "labels.zarr").patient_id[0])])  # a patient of shard 0
    capsys.readouterr()
    for base in (url, "s3://bkt/versioned"):
        assert shards_main(["verify", f"{base}@v2", "--deep", "--workers", "1", "--no-progress"]) == 0
        assert f"{base}@v2" in capsys.readouterr().out
        assert shards_main(["verify", f"{base}@v1", "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "cannot be read or checked" in err and "withdrew patients" in err
        assert shards_main(["versions", base]) == 0
        assert [line.split()[0] for line in capsys.readouterr().out.splitlines()[1:]] == ["v1", "v2"]
    assert ShardCache(cache).path_of(first).exists()
    keys, images = _epoch(f"{url}@v2", cache_dir=cache)
    assert not ShardCache(cache).path_of(first).exists()  # dropped when the dataset was opened
    local_keys, local_images = _epoch(local)
    assert keys == local_keys and np.array_equal(images, local_images)
