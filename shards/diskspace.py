"""Disk space: telling a full disk or an exceeded quota from other write errors, and what a plan needs.

A full filesystem (``ENOSPC``) or an exceeded quota (``EDQUOT``) is not transient: retrying
the write fails again, so a writer stops at once and says what filled up and how much more
the rest needs. NFS and Lustre report ``EDQUOT`` when the data is written back, at
``close()`` or ``fsync()``, so every write path checks those calls too
(:mod:`shards.atomic`, :mod:`shards.writer`).
"""

from __future__ import annotations

import dataclasses
import errno
import os
import tarfile
from pathlib import Path

OUT_OF_SPACE = (errno.ENOSPC, errno.EDQUOT)
"""The errnos of a write that found no room: a full filesystem, an exceeded quota."""
NPY_HEADER = 128
"""Bytes of a ``.npy`` header of a 2-D uint8 array (numpy pads it to 64-byte alignment)."""


def is_out_of_space(exc: BaseException) -> bool:
    """True for an OSError that says the filesystem or the quota is full."""
    return isinstance(exc, OSError) and exc.errno in OUT_OF_SPACE


def what_filled(exc: OSError, path: Path) -> str:
    """What ran out, for a one-line message: ``no space left on the filesystem mounted at M``
    or ``the disk quota on M is exceeded``, M the mount holding the file the error names
    (else ``path``: an ``os.write`` error names none)."""
    where = mount_point(Path(os.fsdecode(exc.filename)) if exc.filename else path)
    if exc.errno == errno.EDQUOT:
        return f"the disk quota on {where} is exceeded"
    return f"no space left on the filesystem mounted at {where}"


def mount_point(path: Path) -> Path:
    """The mount point of the filesystem holding ``path`` (which need not exist)."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still write on the filesystem of ``path`` (or of its
    nearest existing parent). Quotas are not counted: a quota shows only when it is met."""
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def sample_bytes_at_least(size: int) -> int:
    """A lower bound on one sample's bytes in a shard at ``size`` px: the image member (header,
    ``.npy`` header and pixels, padded to a tar block) and the header of its JSON member."""
    npy = NPY_HEADER + size * size
    block = tarfile.BLOCKSIZE
    return block + -(-npy // block) * block + block


def human(n: float) -> str:
    """``n`` bytes as a short figure: 512 B, 3.4 MB, 1.2 GB (powers of 1000)."""
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


@dataclasses.dataclass(frozen=True)
class NoSpace:
    """A task's report that its write found no room: returned, not raised, so that the
    scheduler does not retry it (a full disk is not transient) and the driver stops at once."""

    errno: int
    strerror: str
    filename: str | None

    @classmethod
    def of(cls, exc: OSError) -> "NoSpace":
        return cls(exc.errno or errno.ENOSPC, exc.strerror or os.strerror(exc.errno or errno.ENOSPC),
                   None if exc.filename is None else os.fsdecode(exc.filename))

    def error(self) -> OSError:
        """The error as the task met it."""
        return OSError(self.errno, self.strerror, self.filename)
