"""Whole remote datasets copied to a local folder, for the tools that read a dataset as files
(``python -m shards verify|stats``), which check what they read."""

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
from shards.store import DatasetNotFoundError, Store, open_store, read_manifest_from, retrying

log = logging.getLogger(__name__)


def copy_dataset(store: Store, dest: Path, *, shards: bool = True, progress: bool = False) -> list[str]:
    """Copy a remote dataset's files into ``dest`` as they are (nothing is checked here: the
    copy is for ``python -m shards verify|stats``, which check it); return what was missing.

    Copies ``manifest.json``, ``rejects.jsonl``, ``labels.zarr/`` and, with ``shards``, every
    file the server lists under ``shards/`` (or, when it cannot list, the manifest's shards).
    Each file is retried like a shard fetch.

    Raises:
        DatasetNotFoundError: No ``manifest.json`` at the URL.
        ShardFetchError, CacheFullError: As for a shard fetch.
    """
    manifest = read_manifest_from(store)  # a wrong URL fails here, with its one-line reason
    dest.mkdir(parents=True, exist_ok=True)
    rels = [MANIFEST_NAME, REJECTS_NAME]
    try:
        rels += [f"{LABELS_NAME}/{p}" for p in _walk(store, LABELS_NAME)]
    except (FileNotFoundError, NotImplementedError, ValueError):
        rels += [f"{LABELS_NAME}/zarr.json"]  # verify then names what is missing
    if shards:
        names = store.list_shards()
        rels += [f"{SHARDS_DIR}/{n}" for n in (names if names is not None else [s.name for s in manifest.shards])]
    from tqdm import tqdm

    missing = []
    for rel in tqdm(rels, desc=f"copy {store.display}", unit="file", disable=not progress):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        try:
            _copy_file(store, rel, dest / rel)
        except DatasetNotFoundError:
            missing.append(rel)
    return missing


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
    (removed on exit) and its redacted URL."""
    store = open_store(location)
    if store.local is not None:
        yield store.local, store.display
        return
    tmp = Path(tempfile.mkdtemp(prefix="pneumo-copy-", dir=work_dir))
    try:
        log.info("copying %s to %s", store.display, tmp)
        copy_dataset(store, tmp / "ds", shards=shards, progress=progress)
        yield tmp / "ds", store.display
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
