"""Building a dataset: DICOM files -> CLAHE'd, letterboxed uint8 images in tar shards, on Dask.

Modules, one per stage:

* :mod:`ingest.config`: ``IngestConfig``, the one config of a run (CLI flags map onto it).
* :mod:`ingest.plan`: patient-level split and the shard plan (the inputs come from
  :mod:`shards.source`); :mod:`ingest.tags`: PatientID tags read on the workers
  (``--patient-id tag``, ``patient_id_mismatch``).
* :mod:`ingest.dicom`: strict decoding of one DICOM to uint8 pixels (or a reject reason): the
  raw reader, the pydicom reader, the libjpeg and the general decode; with
  :mod:`ingest.dicom_read` (the bounded pydicom parse and ``DicomRejected``),
  :mod:`ingest.dicom_header` (the raw reader's header walk) and :mod:`ingest.codestream`
  (JPEG SOF / JPEG 2000 SIZ geometry, strict libjpeg-turbo decoding);
  :mod:`ingest.sop`: which SOP classes become samples (``--sop-classes``), judged from the header.
* :mod:`ingest.qa`: the image QA flags of one decoded file (the names and bits are
  :mod:`shards.qa`).
* :mod:`ingest.inputs`: where a worker gets an input's bytes: a file of the folder (with
  :mod:`ingest.readahead`) or a member of a ``.zip``/``.tar`` read in place (:mod:`shards.archive`).
* :mod:`ingest.render`: one file's bytes -> the training image under ``--resample dct|area``.
* :mod:`ingest.transforms`: CLAHE and the letterbox resize (the geometry is
  :mod:`shards.geometry`).
* :mod:`ingest.worker`: one shard task: decode, transform, write the shard, or rebuild it file
  by file in :mod:`ingest.isolate` child processes; :mod:`ingest.readahead` asks the kernel
  for the next files.
* in a worker process: :mod:`ingest.watchdog` (``--sample-timeout``: note the file, kill the
  process), :mod:`ingest.announce` (each task says that it started), :mod:`ingest.memory`
  (glibc ``malloc`` tuning).
* :mod:`ingest.workdir`: the layout of ``OUT/.ingest/``; :mod:`ingest.journal`: each finished
  shard's record there, for a resumed run.
* :mod:`ingest.retry`: what a worker death or a task's error means (retry, isolate, split,
  give up, stop), one pure function per kind of task; :mod:`ingest.runner` observes each event
  on the cluster and carries the step out, never ``KilledWorker``.
* :mod:`ingest.pipeline`: ``run_ingest``, the driver: plan, Dask tasks, labels, manifest last;
  :mod:`ingest.append`: ``run_append`` (``--append``), new files as new shards in a new version.
* :mod:`ingest.cluster`, :mod:`ingest.cluster_base`, :mod:`ingest.slurm` (the worker jobs'
  script, credentials and life cycle), :mod:`ingest.slurm_jobs` (watching them): the Dask
  cluster (a ``LocalCluster`` or Slurm worker jobs).
* :mod:`ingest.synth`: RSNA-like synthetic DICOMs and label CSVs, for demos and tests, and
  ``make_ingested``: such a set, ingested (the data of the benches and tests);
  :mod:`ingest.synth_archive` packs such a set as the competition's zip.
* entry points: ``python -m ingest``, ``ingest.synth``, ``ingest.bench``, ``ingest.compare``,
  ``ingest.slurm_bench``; :mod:`ingest.bench_archive` is ``ingest.bench --archive``,
  :mod:`ingest.bench_append` ``ingest.bench --append``.

The dataset format itself, and the records the driver and the verifier share (the shard record,
the label row, the processing parameters, the run's identity), are :mod:`shards`; ingest stands
on it and never on :mod:`train`. The names below are imported lazily, so
``import ingest.dicom`` does not import Dask.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "IngestConfig": "ingest.config",
    "IngestSummary": "ingest.pipeline",
    "IngestUsageError": "ingest.pipeline",
    "run_ingest": "ingest.pipeline",
    "run_append": "ingest.append",
    "ClusterError": "ingest.cluster_base",
    "DicomRejected": "ingest.dicom",
    "decode_dicom": "ingest.dicom",
    "make_dataset": "ingest.synth",
    "make_ingested": "ingest.synth",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ingest' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
