"""A synthetic data set (:mod:`ingest.synth`) packed as the competition ships its data: one
archive with the images under ``stage_2_train_images/`` and the label CSVs beside them.

``python -m ingest.synth_archive DIR ARCHIVE [--stored]`` packs the set written to ``DIR``
into ``ARCHIVE`` (``.zip`` or ``.tar``), for trying ``python -m ingest --dicom-dir ARCHIVE
--members stage_2_train_images/`` and for the tests and the bench. The archive's bytes depend
only on the files: members in name order, a fixed time stamp and owner.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import tarfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

from ingest.synth import CLASS_INFO_CSV, LABELS_CSV
from shards.cli import EXIT_USAGE, configure_logging
from shards.source import members_prefix

log = logging.getLogger(__name__)

TRAIN_MEMBERS = "stage_2_train_images/"
"""The folder of the training images inside the competition's zip."""
_ZIP_EPOCH = (1980, 1, 1, 0, 0, 0)
"""The earliest time a zip header can hold: a fixed stamp keeps the archive's bytes fixed."""


def _entries(src: Path, members: str) -> list[tuple[str, Path]]:
    """``(name in the archive, file)``: the images under ``members``, the CSVs at the top."""
    images = src / "images"
    found = [(f"{members}{p.relative_to(images).as_posix()}", p) for p in images.rglob("*") if p.is_file()]
    found += [(name, src / name) for name in (LABELS_CSV, CLASS_INFO_CSV) if (src / name).is_file()]
    return sorted(found)


def pack_archive(src: Path, dest: Path, *, members: str = TRAIN_MEMBERS, stored: bool = False) -> Path:
    """Pack the synthetic set in ``src`` into ``dest`` (``.zip`` or ``.tar``, by its suffix).

    Args:
        members: The folder the images go under inside the archive.
        stored: Zip members stored, not deflated (a tar is always stored).

    Raises:
        ValueError: ``dest`` is neither ``.zip`` nor ``.tar``, or ``src`` holds no images.
    """
    kind = dest.suffix.lower()
    if kind not in (".zip", ".tar"):
        raise ValueError(f"{dest}: the archive must be named .zip or .tar")
    entries = _entries(Path(src), members)
    if not any(name.startswith(members) for name, _ in entries):
        raise ValueError(f"{src}: no images under {src / 'images'}")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.partial"
    if kind == ".zip":
        method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
        with zipfile.ZipFile(tmp, "w") as zf:
            for name, path in entries:
                info = zipfile.ZipInfo(name, _ZIP_EPOCH)
                info.compress_type = method
                info.external_attr = 0o644 << 16
                zf.writestr(info, path.read_bytes())
    else:
        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tf:
            for name, path in entries:
                data = path.read_bytes()
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tf.addfile(info, io.BytesIO(data))
    os.replace(tmp, dest)
    log.info("packed %d files from %s into %s", len(entries), src, dest)
    return dest


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ingest.synth_archive",
        description="Pack a synthetic data set (python -m ingest.synth) as the competition's archive: "
        "the images under stage_2_train_images/, the label CSVs beside them.",
    )
    p.add_argument("src", type=Path, help="a folder written by python -m ingest.synth")
    p.add_argument("dest", type=Path, help="the archive to write (.zip or .tar)")
    p.add_argument("--members", default=TRAIN_MEMBERS, help="folder of the images inside the archive")
    p.add_argument("--stored", action="store_true", help="zip members stored, not deflated")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(level=logging.INFO, dask=False)
    try:
        pack_archive(args.src, args.dest, members=members_prefix(args.members), stored=args.stored)
    except ValueError as exc:
        log.error("%s", exc)
        return EXIT_USAGE
    print(args.dest)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
