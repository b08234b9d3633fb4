"""A real small filesystem for the tests: a tmpfs of a few kB mounted on a test's folder (root only)."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


@contextlib.contextmanager
def tmpfs(mnt: Path, size_kb: int, *, read_only: bool = False) -> Iterator[Path]:
    """Mount a tmpfs of ``size_kb`` kB on ``mnt`` (created) for the with-block; skip the test
    where that is not allowed (not root, no ``mount``, a container without CAP_SYS_ADMIN)."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a tmpfs needs root and mount(8)")
    mnt.mkdir(parents=True, exist_ok=True)
    options = f"size={size_kb}k" + (",ro" if read_only else "")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)  # a process still holds it: detach


def resize(mnt: Path, size_kb: int) -> None:
    """Grow (or shrink) the tmpfs on ``mnt``, keeping what it holds."""
    subprocess.run(["mount", "-o", f"remount,size={size_kb}k", str(mnt)], check=True)
