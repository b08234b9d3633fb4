"""The source folder of a dataset: which files are inputs, their fingerprint, patient ids by name.

Both the ingest (to plan) and ``shards verify --source`` (to check that every input is one
sample or one reject) find the inputs with :func:`discover`, so they always agree.

Discovery is built for a shared filesystem with tens of thousands of files: the folder walk
uses ``os.scandir`` (file types come with the listing), ``*.dcm`` files are inputs by their
suffix and never opened, and the sizes of all files plus the ``DICM`` preamble check of the
files without that suffix (UID-named files) run on a thread pool, where the filesystem's
latency overlaps instead of adding up. A ``*.dcm`` file without the preamble is still an
input; the ingest's decoder rejects it as ``not_dicom``.

A ``.zip`` or ``.tar`` in place of the folder is searched the same way, inside, from its
member index (:mod:`shards.archive`): a member's path inside the archive is its input path,
and ``members`` (a folder inside the archive) narrows the search to that folder.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

from shards.archive import ArchiveIndex, ArchiveReader, is_archive, read_index

DICOM_SUFFIX = ".dcm"
PREAMBLE_OFFSET = 128
PREAMBLE = b"DICM"
STAT_THREADS = 32
"""Threads for stat and preamble checks: enough to hide a network filesystem's latency."""
STAT_CHUNK = 256
"""Files per thread-pool job (one job per file would cost more in futures than in stats)."""


class Discovered(NamedTuple):
    """The inputs found under a folder (``discover(d)[0]`` is the input list)."""

    inputs: list[tuple[str, int]]
    """Sorted ``(relative posix path, size)`` of every input file."""
    ignored: int
    """Files that are neither ``*.dcm`` nor carry the DICOM preamble."""
    archive: ArchiveIndex | None = None
    """The archive's index narrowed to the inputs, when the source is an archive."""


def has_preamble(path: Path | str) -> bool:
    """True if the file carries the DICOM ``DICM`` marker at byte 128."""
    try:
        with open(path, "rb") as f:
            head = f.read(PREAMBLE_OFFSET + len(PREAMBLE))
    except OSError:
        return False
    return head[PREAMBLE_OFFSET:] == PREAMBLE


def is_dicom_name(name: str) -> bool:
    """True for a ``*.dcm`` file name (any case): an input without opening it."""
    return name.lower().endswith(DICOM_SUFFIX)


def _walk(root: Path) -> list[str]:
    """Relative posix paths of the regular files under ``root``, hidden entries skipped."""
    found: list[str] = []
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        with os.scandir(root / rel_dir if rel_dir else root) as it:
            for entry in it:
                if entry.name.startswith("."):
                    continue
                rel = f"{rel_dir}/{entry.name}" if rel_dir else entry.name
                if entry.is_dir(follow_symlinks=False):
                    stack.append(rel)
                elif entry.is_file(follow_symlinks=True):
                    found.append(rel)
    return found


def _check_chunk(root: Path, rels: list[str]) -> list[tuple[str, int] | None]:
    """``(rel, size)`` for each input of ``rels``, None for a file that is not one."""
    out: list[tuple[str, int] | None] = []
    for rel in rels:
        path = root / rel
        try:
            size = path.stat().st_size
        except OSError:
            out.append(None)  # vanished since the listing
            continue
        out.append((rel, size) if is_dicom_name(rel) or has_preamble(path) else None)
    return out


def _is_hidden(rel: str) -> bool:
    return any(part.startswith(".") for part in rel.split("/"))


def members_prefix(members: str | None) -> str:
    """``--members`` as a folder prefix inside an archive: ``a/b`` and ``a/b/`` give ``a/b/``;
    None or empty selects the whole archive."""
    folder = (members or "").strip("/")
    return f"{folder}/" if folder else ""


def discover_archive(archive: Path, members: str | None = None) -> Discovered:
    """:func:`discover` inside a ``.zip`` or ``.tar``: the regular members under the folder
    ``members`` (all when None), hidden ones skipped, ``*.dcm`` by name and others by the
    preamble (read from the member, inflated in memory).

    Raises:
        shards.archive.ArchiveError: the archive cannot be read.
    """
    index = read_index(archive)
    prefix = members_prefix(members)
    candidates = [m for name, m in index.members.items() if name.startswith(prefix) and not _is_hidden(name)]
    found: list[tuple[str, int]] = []
    ignored = 0
    with ArchiveReader(index) as reader:
        for m in candidates:
            if is_dicom_name(m.name) or reader.head(m, PREAMBLE_OFFSET + len(PREAMBLE))[PREAMBLE_OFFSET:] == PREAMBLE:
                found.append((m.name, m.size))
            else:
                ignored += 1
    found.sort()
    return Discovered(found, ignored, index.subset([rel for rel, _ in found]))


def discover(dicom_dir: Path, members: str | None = None) -> Discovered:
    """Find the input files under ``dicom_dir``: every ``*.dcm`` plus any other file that
    carries the DICOM preamble (UID-named files, files without a suffix).

    ``dicom_dir`` may be a ``.zip`` or ``.tar`` archive (see :func:`discover_archive`);
    ``members`` selects a folder inside it.

    Returns:
        :class:`Discovered`: the sorted ``(relative posix path, size)`` inputs and the number
        of other files ignored.
    """
    if is_archive(dicom_dir):
        return discover_archive(Path(dicom_dir), members)
    root = Path(dicom_dir)
    files = _walk(root)
    chunks = [files[i : i + STAT_CHUNK] for i in range(0, len(files), STAT_CHUNK)]
    found: list[tuple[str, int]] = []
    ignored = 0
    if chunks:
        with ThreadPoolExecutor(max_workers=min(STAT_THREADS, len(chunks)), thread_name_prefix="discover") as pool:
            for results in pool.map(lambda c: _check_chunk(root, c), chunks):
                for item in results:
                    if item is None:
                        ignored += 1
                    else:
                        found.append(item)
    found.sort()
    return Discovered(found, ignored)


def source_fingerprint(inputs: list[tuple[str, int]]) -> str:
    """SHA-256 over the sorted (relative path, size) list of the inputs."""
    h = hashlib.sha256()
    for rel, size in inputs:
        h.update(f"{rel}\t{size}\n".encode())
    return h.hexdigest()


def patient_id_of(rel_path: str) -> str:
    """RSNA names files ``<patientId>.dcm``; a UID-named file is its own id (dots kept)."""
    name = rel_path.rsplit("/", 1)[-1]
    return name[: -len(DICOM_SUFFIX)] if is_dicom_name(name) else name
