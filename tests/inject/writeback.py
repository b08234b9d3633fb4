"""A write-back that fails, as NFS and Lustre report a quota met: ``os.fdatasync`` raises.

``PNEUMO_WRITEBACK=EDQUOT`` (or ``ENOSPC``, ``EIO``: an errno name) makes every
``os.fdatasync`` of the process raise that error after syncing, the way a network
filesystem reports, at write-back, a write it had accepted. Armed by ``sitecustomize``.
"""

from __future__ import annotations

import errno
import os


def arm(name: str) -> None:
    code = getattr(errno, name)
    real = os.fdatasync

    def failing_fdatasync(fd: int) -> None:
        real(fd)
        raise OSError(code, os.strerror(code))

    os.fdatasync = failing_fdatasync
