"""Atomic file writes: every file the project writes appears whole under its name, or not at all.

A writer writes under a temporary name in the same folder, (optionally) syncs it, and renames it
into place. A failure at any point, including at ``close()`` or ``fsync()`` (where NFS and Lustre
report a full quota), removes the temporary file and leaves the old file untouched.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any


def temp_name(path: Path) -> Path:
    """The temporary name a file is written under before it is renamed to ``path``: hidden, in
    the same folder (so the rename stays on one filesystem), and unique to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


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
