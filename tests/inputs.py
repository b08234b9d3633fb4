"""Input folders for ingest tests, made from a synthetic set's files."""

from __future__ import annotations

import shutil
from collections.abc import Iterable
from pathlib import Path


def copy_into(folder: Path, files: Iterable[Path]) -> Path:
    """``folder`` (made, parents included) holding copies of ``files`` under their names."""
    folder.mkdir(parents=True)
    for f in files:
        shutil.copyfile(f, folder / f.name)
    return folder
