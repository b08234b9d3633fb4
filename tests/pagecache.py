"""Whether a file's pages are in the page cache, asked without reading them (for the tests of
the shard writer's direct writes and of the read-ahead)."""

from __future__ import annotations

import ctypes
import mmap
import os
from pathlib import Path


def cached(path: Path) -> bool:
    """Whether the first page of ``path`` is in the page cache: ``mincore`` on a mapping of it,
    which reads nothing. (A probing read with ``RWF_NOWAIT`` starts the read it reports as
    missing, and a fast disk can finish it in time to be seen: a flaky probe.)"""
    libc = ctypes.CDLL(None, use_errno=True)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), mmap.PAGESIZE, access=mmap.ACCESS_COPY) as mapped:
        view = ctypes.c_char.from_buffer(mapped)  # only for the address; touches no page
        vec = (ctypes.c_ubyte * 1)()
        rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(mmap.PAGESIZE), vec)
        del view  # the mapping cannot close while a ctypes object exports it
        if rc != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return bool(vec[0] & 1)


def evict(path: Path) -> bool:
    """Write ``path`` back and drop its pages from the page cache; False where they stay (a
    filesystem that keeps files in memory, such as tmpfs)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    return not cached(path)
