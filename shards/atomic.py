"""Atomic writes: every file or folder the project writes appears whole under its name, or not at all.

A writer writes under a temporary name in the same folder, (optionally) syncs it, and renames it
into place. A failure at any point, including at ``close()`` or ``fsync()`` (where NFS and Lustre
report a full quota), removes the temporary file and leaves the old file untouched.

Three forms, for three kinds of writer:

- :func:`atomic_write` (and :func:`atomic_write_bytes`, :func:`atomic_write_text`): our own code
  writes to an open file.
- :func:`atomic_path`: another library writes a file by name (``fs.get_file``).
- :func:`atomic_dir`: another library writes a folder (a zarr store).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def temp_name(path: Path) -> Path:
    """The temporary name ``path`` is written under before its rename: hidden, in the same
    folder (so the rename stays on one filesystem), and unique to this process and thread."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{threading.get_ident()}")


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: Path | str, mode: str = "wb", *, durable: bool = True, **open_kwargs: Any) -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit, close it and rename it to ``path``.

    Args:
        path: the file to write.
        mode: ``"wb"`` or ``"w"`` (text; ``open_kwargs`` such as ``newline`` pass through).
        durable: fsync the file before the rename, so a crash never leaves a renamed file whose
            data is not on disk. A file whose readers check it anyway may skip that wait.

    Yields:
        the open temporary file.

    Raises:
        OSError: from writing, flushing, syncing, closing or renaming; the temporary file is
            removed and ``path`` keeps its old content.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write: mode {mode!r} is not 'w' or 'wb'")
    path = Path(path)
    tmp = temp_name(path)
    f = open(tmp, mode, **open_kwargs)
    try:
        try:
            yield f
            f.flush()
            if durable:
                os.fsync(f.fileno())
        finally:
            f.close()  # an error at close (EDQUOT written back) propagates
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path | str, data: bytes, *, durable: bool = True) -> None:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "wb", durable=durable) as f:
        f.write(data)


def atomic_write_text(path: Path | str, text: str, *, durable: bool = True) -> None:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write`)."""
    with atomic_write(path, "w", durable=durable) as f:
        f.write(text)


@contextlib.contextmanager
def atomic_path(path: Path | str, *, durable: bool = True) -> Iterator[Path]:
    """Yield the temporary name for a file that the caller has written (by name) when the block
    ends cleanly; then rename it to ``path``.

    Args:
        path: the file to write.
        durable: fsync the file before the rename (see :func:`atomic_write`).

    Raises:
        FileNotFoundError: the block ended cleanly without writing the file.
        OSError: from syncing or renaming; the temporary file is removed and ``path`` keeps its
            old content. An exception from the block also removes the temporary file.
    """
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        if durable:
            _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_dir(path: Path | str) -> Iterator[Path]:
    """Yield a temporary folder name for the caller to build a folder under; when the block ends
    cleanly, replace ``path`` (if any) with it.

    The temporary name is not made: the caller's library creates it. A folder cannot be renamed
    over a non-empty one, so the old folder is first renamed aside, then removed after the new
    one is in place; between those two renames (a moment) ``path`` is absent. One writer per
    ``path``: temporary folders left by a killed writer of ``path`` are removed first.

    Raises:
        OSError: from the renames; the temporary folder is removed and ``path`` keeps its
            old content. An exception from the block also removes the temporary folder.
    """
    path = Path(path)
    for pattern in (f".{path.name}.tmp-*", f".{path.name}.old-*"):
        for stale in path.parent.glob(pattern):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = temp_name(path)
    old = path.with_name(f".{path.name}.old-{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        if not tmp.is_dir():
            raise FileNotFoundError(f"{tmp}: the block made no folder to rename to {path}")
        if path.exists():
            os.replace(path, old)
        try:
            os.replace(tmp, path)
        except BaseException:
            if old.exists() and not path.exists():
                os.replace(old, path)
            raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
