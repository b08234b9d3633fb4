"""The layout of ``OUT/.ingest/``, the scratch folder of an unfinished ingest.

Everything a run keeps for a resumed run, and every note a worker leaves for the driver, lives
under it; the driver removes it once ``manifest.json`` is written (``shards.verify`` reports one
left behind as ``ingest_unfinished``).

- ``params.json``: the run's identity (:class:`shards.manifest.RunIdentity`);
- ``done/<shard>.json``: each finished shard's record (:mod:`ingest.journal`);
- ``suspects/``: watchdog notes of files that hung a worker (:mod:`ingest.watchdog`);
- ``tags.json``: PatientID tags already read (:mod:`ingest.tags`);
- ``tls-*/``: a Slurm run's private credentials (:mod:`ingest.slurm`).
"""

from __future__ import annotations

from pathlib import Path

from shards.manifest import WORK_DIR

__all__ = ["WORK_DIR", "done_dir", "params_file", "suspects_dir", "tags_file", "work_dir"]


def work_dir(out: Path) -> Path:
    """``OUT/.ingest``."""
    return Path(out) / WORK_DIR


def params_file(out: Path) -> Path:
    """The identity of the run that owns ``out``, written before any work."""
    return work_dir(out) / "params.json"


def done_dir(out: Path) -> Path:
    """One JSON per finished shard."""
    return work_dir(out) / "done"


def suspects_dir(out: Path) -> Path:
    """One JSON per file that kept a worker busy past ``--sample-timeout``."""
    return work_dir(out) / "suspects"


def tags_file(out: Path) -> Path:
    """The PatientID tags read so far."""
    return work_dir(out) / "tags.json"
