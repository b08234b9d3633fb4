"""Configuration of the ingest job: one keyword-only dataclass, validated on creation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal

from shards.manifest import DEFAULT_MAX_PIXELS, ProcessingParams

CLUSTERS = ("local", "slurm")
RESAMPLE_MODES = ("dct", "area")
PROCESSING_FIELDS = tuple(f.name for f in dataclasses.fields(ProcessingParams))
"""The fields of :class:`IngestConfig` that decide a sample's pixels; the worker gets these."""
PATIENT_ID_SOURCES = ("name", "tag")
SOP_CLASS_POLICIES = ("radiograph", "any-image")
"""Values of ``sop_classes`` (:mod:`ingest.sop` judges by them)."""


@dataclasses.dataclass(kw_only=True)
class IngestConfig:
    """Everything an ingest run needs; CLI flags of ``python -m ingest`` map onto these fields."""

    dicom_dir: Path
    """Folder searched recursively for DICOM files, or a ``.zip``/``.tar`` read in place."""
    out: Path
    """Output dataset folder (created; resumed if it holds an unfinished run)."""
    labels: Path | None = None
    """``stage_2_train_labels.csv``; None ingests an unlabelled (inference) set."""
    class_info: Path | None = None
    """Optional ``stage_2_detailed_class_info.csv``."""
    cluster: Literal["local", "slurm"] = "local"
    """Where the Dask workers run: a LocalCluster here, or Slurm jobs via dask-jobqueue."""
    workers: int | None = None
    """Local worker processes (default: all cores); ignored on Slurm (use ``jobs``)."""
    jobs: int = 2
    """Slurm worker jobs to keep running (``--cluster slurm``)."""
    queue: str | None = None
    """Slurm partition (overrides the dask config's ``jobqueue.slurm.queue``)."""
    account: str | None = None
    """Slurm account (overrides ``jobqueue.slurm.account``)."""
    walltime: str | None = None
    """Walltime of each worker job, ``HH:MM:SS`` (overrides ``jobqueue.slurm.walltime``)."""
    worker_timeout: float = 300.0
    """Seconds to wait for the first worker before giving up with an error."""
    dry_run: bool = False
    """Print the Slurm job script and exit without starting anything."""
    shard_size: int = 256
    """Samples per shard (about 105 MB at 640 px)."""
    size: int = 640
    """Side of the square output images."""
    clahe_clip: float = 2.0
    """CLAHE clip limit (OpenCV ``clipLimit``)."""
    clahe_grid: int = 8
    """CLAHE tile grid (``grid`` x ``grid`` tiles)."""
    resample: Literal["dct", "area"] = "dct"
    """``dct``: JPEG frames decoded at a reduced n/8 scale, CLAHE at the output size;
    ``area``: full-size decode, CLAHE, area resize (the original order, same bytes)."""
    max_pixels: int = DEFAULT_MAX_PIXELS
    """Images with more Rows x Columns are rejected (``too_large``) before decoding."""
    val_fraction: float = 0.1
    """Fraction of patients, per target stratum, put in the ``val`` split."""
    seed: int = 0
    """Seed of the patient-level split and of the shard order."""
    progress: bool = True
    """Show a progress bar on stderr."""
    sample_timeout: float = 300.0
    """Seconds one file may keep a worker busy; past it the file is a ``sample_timeout`` reject."""
    patient_id: Literal["name", "tag"] = "name"
    """Where a sample's patient id comes from: the file name (RSNA's ``<id>.dcm``) or the PatientID tag."""
    pseudonymize: Path | None = None
    """Key file (mode 600): patient ids, sample keys and paths leave the ingest as keyed hashes
    of themselves (:mod:`shards.pseudonym`); None records them as they are."""
    members: str | None = None
    """A folder inside the ``dicom_dir`` archive to ingest (``stage_2_train_images/``); None: all of it."""
    sop_classes: Literal["radiograph", "any-image"] = "radiograph"
    """SOP classes that become samples: CR, DX and Secondary Capture, or every image class
    (non-image objects are ``not_an_image`` rejects either way; see :mod:`ingest.sop`)."""
    append: bool = False
    """Add the new files of ``dicom_dir`` to the dataset at ``out`` as a new version
    (:mod:`ingest.append`), under the parameters recorded there."""

    def __post_init__(self) -> None:
        self.dicom_dir, self.out = Path(self.dicom_dir), Path(self.out)
        self.labels = Path(self.labels) if self.labels else None
        self.class_info = Path(self.class_info) if self.class_info else None
        self.pseudonymize = Path(self.pseudonymize) if self.pseudonymize else None
        if self.cluster not in CLUSTERS:
            raise ValueError(f"cluster={self.cluster!r}; allowed: {', '.join(CLUSTERS)}")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"workers={self.workers}; must be >= 1")
        if self.jobs < 1:
            raise ValueError(f"jobs={self.jobs}; must be >= 1")
        if self.shard_size < 1:
            raise ValueError(f"shard_size={self.shard_size}; must be >= 1")
        if not 32 <= self.size <= 4096:
            raise ValueError(f"size={self.size}; allowed 32..4096")
        if not self.clahe_clip > 0:
            raise ValueError(f"clahe_clip={self.clahe_clip}; must be > 0")
        if not 1 <= self.clahe_grid <= 64:
            raise ValueError(f"clahe_grid={self.clahe_grid}; allowed 1..64")
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"resample={self.resample!r}; allowed: {', '.join(RESAMPLE_MODES)}")
        if self.max_pixels < 1:
            raise ValueError(f"max_pixels={self.max_pixels}; must be >= 1")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction}; allowed 0 <= f < 1")
        if not self.sample_timeout > 0:
            raise ValueError(f"sample_timeout={self.sample_timeout}; must be > 0 seconds")
        if self.patient_id not in PATIENT_ID_SOURCES:
            raise ValueError(f"patient_id={self.patient_id!r}; allowed: {', '.join(PATIENT_ID_SOURCES)}")
        if self.sop_classes not in SOP_CLASS_POLICIES:
            raise ValueError(f"sop_classes={self.sop_classes!r}; allowed: {', '.join(SOP_CLASS_POLICIES)}")
        if self.class_info and not self.labels:
            raise ValueError("class_info given without labels")

    def processing_params(self) -> ProcessingParams:
        """The parameters that decide the pixels of a sample."""
        return ProcessingParams(**{name: getattr(self, name) for name in PROCESSING_FIELDS})

    def dataset_params(self) -> dict[str, Any]:
        """All parameters that decide the bytes of the output (recorded in the manifest)."""
        return {
            **self.processing_params().to_params(),
            "shard_size": self.shard_size,
            "val_fraction": self.val_fraction,
            "seed": self.seed,
            "patient_id": self.patient_id,
        }
