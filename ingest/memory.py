"""glibc ``malloc`` tuning of an ingest worker process."""

from __future__ import annotations

import ctypes
import functools

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
"""glibc ``mallopt`` parameters (malloc.h)."""
MMAP_THRESHOLD = 16 << 20
TRIM_THRESHOLD = 64 << 20


@functools.cache
def keep_freed_buffers() -> bool:
    """Let this process reuse the image-sized buffers it frees; False where libc is not glibc.

    Dask's nanny starts workers with ``MALLOC_TRIM_THRESHOLD_=65536``, which also pins glibc's
    mmap threshold at 128 KiB: every buffer of a decoded or CLAHE'd image (400 KB at 640 px) is
    then a fresh mmap whose pages the kernel zeroes and faults in again. A worker holds one
    shard's images at a time, so keeping up to 64 MiB of freed memory bounds what this costs.
    Called by each shard task (once per process takes effect), not at import: in other
    processes (a loader holding whole shards of 26 MB) a fixed threshold is slower than glibc's
    own adaptive one.
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
