"""Whole remote datasets copied to a local folder, and one version of a local dataset seen as a
folder, for the tools that read a dataset as files (``python -m shards verify|stats|show``),
which check what they read."""

from __future__ import annotations

import errno
import logging
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shards.atomic import atomic_path
from shards.cache import CacheFullError, cache_error, tries_failed
from shards.manifest import LABELS_NAME, MANIFEST_NAME, REJECTS_NAME, SHARDS_DIR
from shards.store import (
    DatasetNotFoundError,
    Store,
    open_store,
    read_latest_manifest,
    read_manifest_from,
    retrying,
    version_rels,
)

log = logging.getLogger(__name__)


def copy_dataset(store: Store, dest: Path, *, shards: bool = True, progress: bool = False) -> list[str]:
    """Copy a remote dataset's files into ``dest`` as they are (nothing is checked here: the
    copy is for ``python -m shards verify|stats``, which check it); return what was missing.

    Copies ``manifest.json``, ``rejects.jsonl``, ``labels.zarr/`` and, with ``shards``, every
    file the server lists under ``shards/`` (or, when it cannot list, the manifest's shards).
    A store naming a version (``@vN``) is copied as that version alone: its manifest, rejects,
    label store and shards under the names above; so is a dataset with several versions,
    whose ``shards/`` holds the other versions' shards too. Each file is retried like a shard
    fetch.

    Raises:
        DatasetNotFoundError: No ``manifest.json`` at the URL.
        VersionNotFoundError, VersionUnavailableError: The version named cannot be read.
        ShardFetchError, CacheFullError: As for a shard fetch.
    """
    latest = read_latest_manifest(store)  # a wrong URL fails here, with its one-line reason
    manifest = read_manifest_from(store)
    labels, rejects = version_rels(store, latest)
    dest.mkdir(parents=True, exist_ok=True)
    pairs = [(REJECTS_NAME, rejects)]
    if manifest is latest:
        pairs.append((MANIFEST_NAME, MANIFEST_NAME))
    else:
        (dest / MANIFEST_NAME).write_text(manifest.to_json())
    try:
        pairs += [(f"{LABELS_NAME}/{p}", f"{labels}/{p}") for p in _walk(store, labels)]
    except (FileNotFoundError, NotImplementedError, ValueError):
        pairs += [(f"{LABELS_NAME}/zarr.json", f"{labels}/zarr.json")]  # verify then names what is missing
    if shards:
        names = store.list_shards() if latest.version == 1 else None
        names = names if names is not None else [s.name for s in manifest.shards]
        pairs += [(f"{SHARDS_DIR}/{n}", f"{SHARDS_DIR}/{n}") for n in names]
    from tqdm import tqdm

    missing = []
    for rel, src in tqdm(pairs, desc=f"copy {store.named}", unit="file", disable=not progress):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            _copy_file(store, src, dest / rel)
        except DatasetNotFoundError:
            missing.append(src)
    return missing


def version_view(store: Store, dest: Path) -> Path:
    """A folder at ``dest`` that holds one version of a local dataset under the usual names:
    its manifest and rejects as files, its label store and shards as links into the dataset
    (nothing is copied); for the readers that take a folder (verify, stats, show)."""
    assert store.local is not None
    latest = read_latest_manifest(store)
    manifest = read_manifest_from(store)
    labels, rejects = version_rels(store, latest)
    (dest / SHARDS_DIR).mkdir(parents=True)
    (dest / MANIFEST_NAME).write_text(manifest.to_json())
    if (store.local / rejects).exists():
        shutil.copyfile(store.local / rejects, dest / REJECTS_NAME)
    if (store.local / labels).exists():
        (dest / LABELS_NAME).symlink_to((store.local / labels).resolve(), target_is_directory=True)
    for s in manifest.shards:
        if (store.local / SHARDS_DIR / s.name).exists():
            (dest / SHARDS_DIR / s.name).symlink_to((store.local / SHARDS_DIR / s.name).resolve())
    return dest


def _walk(store: Store, rel: str) -> list[str]:
    """Paths of the files under ``rel``, relative to it."""
    base = store.path(rel).rstrip("/")
    out = []
    for p in store.fs.find(base):
        p = str(p)
        if not p.startswith(base):  # http lists absolute URLs
            p = base + "/" + p.split(f"/{rel}/", 1)[-1]
        sub = p[len(base):].lstrip("/")
        if sub:
            out.append(sub)
    return sorted(out)


def _copy_file(store: Store, rel: str, dest: Path) -> None:
    url = store.url(rel)

    def attempt() -> None:
        try:
            with atomic_path(dest, durable=False) as tmp:
                store.fs.get_file(store.path(rel), str(tmp))
        except FileNotFoundError as exc:
            raise DatasetNotFoundError(f"{url}: not found") from exc
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise cache_error(dest.parent, exc, f"writing {url}") from exc
            raise

    retrying(url, attempt, not_retried=(DatasetNotFoundError, CacheFullError),
             give_up=tries_failed(url))


@contextmanager
def local_copy(location: str | Path, *, shards: bool = True, work_dir: Path | None = None,
               progress: bool = False) -> Iterator[tuple[Path, str]]:
    """``(folder, display)``: the dataset itself when local, else a temporary copy of it
    (removed on exit), and its redacted name. A version (``OUT@vN``) of a local dataset is a
    temporary :func:`version_view` of it."""
    store = open_store(location)
    if store.local is not None and store.version is None:
        yield store.local, store.display
        return
    tmp = Path(tempfile.mkdtemp(prefix="pneumo-copy-", dir=work_dir))
    try:
        if store.local is not None:
            yield version_view(store, tmp / "ds"), store.named
            return
        log.info("copying %s to %s", store.named, tmp)
        copy_dataset(store, tmp / "ds", shards=shards, progress=progress)
        yield tmp / "ds", store.named
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
