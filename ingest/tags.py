"""The PatientID tag of many files, read on the Dask workers before planning.

``--patient-id tag`` plans by the tag, so every input's tag is read first; with the default
``--patient-id name`` only the files rejected before decoding as ``no_label`` are read, so
that their ``patient_id_mismatch`` lines show why a renamed file found no label. Headers are
read up to the pixel data, never the pixels, in batches of :data:`BATCH` files per task.

A batch whose worker dies is split into one task per file; a file whose worker dies twice is
given up (``worker_crashed``); a file that keeps its worker busy past ``--sample-timeout`` is
noted by the worker's watchdog and given up (``sample_timeout``), as when building shards.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pydicom

from ingest.announce import announce_start
from ingest.dicom_read import describe, lenient_values
from ingest.inputs import read_input
from ingest.plan import Reject
from ingest.watchdog import WATCHDOG
from ingest.workdir import tags_file
from shards.archive import ArchiveIndex, MemberError
from shards.atomic import atomic_write_text

log = logging.getLogger(__name__)

BATCH = 256
"""Files per header-reading task: a task costs a few ms, a header about 1 ms."""
NOTE_SHARD = "tags"
"""Shard name under which the watchdog notes a file that hangs its header read."""

TagResult = tuple[str | None, Reject | None]
"""``(PatientID, None)``, or ``(None, why it could not be read)``."""


def read_patient_id(path: Path | io.BytesIO) -> str | None:
    """The PatientID of one file (header only, stops before the pixel data); None if empty.

    Raises:
        Exception: whatever pydicom raises on an unreadable header.
    """
    with lenient_values():
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        value = str(ds.get("PatientID", "") or "").strip()
    return value or None


def read_patient_ids(
    dicom_dir: str, rels: list[str], out: str, timeout_s: float, archive: ArchiveIndex | None = None
) -> dict[str, TagResult]:
    """:func:`read_patient_id` for ``rels`` (run as one Dask task), members of ``archive``
    when given (each read whole and parsed in memory)."""
    announce_start()
    found: dict[str, TagResult] = {}
    detail = f"reading its header took more than {timeout_s:g} s (--sample-timeout); its worker was restarted"
    note_dir = Path(out)
    for rel in rels:
        WATCHDOG.arm(timeout_s, note_dir, NOTE_SHARD, rel, detail)
        try:
            source = Path(dicom_dir) / rel if archive is None else io.BytesIO(read_input(dicom_dir, archive, rel))
            tag = read_patient_id(source)
        except MemberError as exc:  # the member's bytes are damaged: the same reject as when decoding
            found[rel] = (None, Reject(rel, exc.reason, exc.detail))
        except Exception as exc:  # any unreadable header: the decoder will say more, if it gets the file
            found[rel] = (None, Reject(rel, "no_patient_id", f"header unreadable ({describe(exc)})"))
        else:
            found[rel] = (tag, None) if tag else (None, Reject(rel, "no_patient_id", "no PatientID tag, or it is empty"))
        finally:
            WATCHDOG.disarm()
    return found


def load_cached(out: Path) -> dict[str, TagResult]:
    """Tags read by an earlier, interrupted run of the same ingest into ``out``."""
    try:
        raw = json.loads(tags_file(out).read_text())
    except (OSError, ValueError):
        return {}
    return {rel: (tag, Reject(**rej) if rej else None) for rel, (tag, rej) in raw.items()}


def save_cache(out: Path, tags: dict[str, TagResult]) -> None:
    """Keep the tags read for a resumed run (see :func:`load_cached`)."""
    raw = {rel: (tag, {"path": r.path, "reason": r.reason, "detail": r.detail} if r else None) for rel, (tag, r) in tags.items()}
    atomic_write_text(tags_file(out), json.dumps(raw, sort_keys=True))
