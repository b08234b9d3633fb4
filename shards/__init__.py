"""The dataset format and its tools: tar shards of ``<key>.npy`` + ``<key>.json`` samples,
``labels.zarr``, ``manifest.json`` and ``rejects.jsonl``.

This is the bottom layer: ``ingest/`` (which builds datasets) and ``train/`` (which reads them)
stand on it and never on each other. Modules:

* :mod:`shards.format`: member names, encode/decode (never pickled), classes, splits.
* :mod:`shards.geometry`: the letterbox every sample records as ``transform``.
* :mod:`shards.manifest`: ``manifest.json`` and its ``params_hash``; the dataset's file names;
  a shard as the manifest records it (``ShardInfo``), the processing parameters and the run's
  identity (``ProcessingParams``, ``RunIdentity``); :mod:`shards.jsontext`: the indented JSON
  text of the manifest, the version records and the source index (``json.dumps``'s bytes, faster).
* :mod:`shards.atomic`: the one way every file and folder is written (temporary name, rename).
* :mod:`shards.labels`: ``labels.zarr`` and its row (``LabelRow``, from a sample's JSON);
  :mod:`shards.label_csv`: RSNA's label CSVs.
* :mod:`shards.qa`: the image QA flags: names, rules, their bits in ``labels.zarr``'s ``qa``.
* :mod:`shards.records`: what an ingest's workers hand its driver (``ShardRecord``, ``Reject``).
* :mod:`shards.source`: the source folder: its inputs, fingerprint, patient ids by name;
  :mod:`shards.archive`: a source ``.zip``/``.tar`` read in place (member index, reads by offset).
* :mod:`shards.versions`: version records (``versions/vNNNN.json``), ``OUT@vN``, gc;
  :mod:`shards.withdraw`: erasing patients in a new version; :mod:`shards.source_index`: the
  source files and labels a dataset holds, by sample key, which an append reads.
* :mod:`shards.writer`: the deterministic shard writer; :mod:`shards.tar`: the one tar parser;
  :mod:`shards.reader`: the readers, which check what they read (each sample against its
  xxh3 digests, :mod:`shards.checksum`; a format 1 shard against its sha256).
* reading a dataset wherever it is: :mod:`shards.store` (folders, HTTP(S), S3),
  :mod:`shards.origin` (where a loader gets each shard), :mod:`shards.cache` (the node cache),
  :mod:`shards.prefetch` (a lane's shards fetched ahead), :mod:`shards.local_copy` (a remote
  dataset copied for verify and stats).
* integrity checks: :mod:`shards.verify` (the driver), :mod:`shards.scan` (one shard in one
  pass), :mod:`shards.crosschecks` (dataset-level checks), :mod:`shards.schema` (the JSON
  Schemas of the manifest's fields), :mod:`shards.report` (the check table and the report).
* entry points: ``python -m shards`` (verify / stats / show / versions / withdraw / gc),
  ``shards.bench`` (its sections in :mod:`shards.remote_bench`, what they share in
  :mod:`shards.bench_common`);
  :mod:`shards.cli` is what every entry point of the project shares (logging, exit codes).

:mod:`shards.stats` and :mod:`shards.show` need matplotlib and are not imported here.
"""

from shards.format import (
    CLASS_NAMES,
    POSITIVE_CLASS,
    FORMAT_VERSION,
    FORMAT_VERSIONS,
    IMAGE_EXT,
    META_EXT,
    META_FIELDS,
    SPLITS,
    FormatError,
    check_key,
    check_member_name,
    decode_image,
    decode_meta,
    encode_image,
    encode_meta,
    key_for,
    shard_name,
    split_member,
)
from shards.geometry import Letterbox, boxes_from_letterbox, boxes_to_letterbox, letterbox_geometry
from shards.label_csv import LabelFileError, read_label_csv
from shards.labels import LabelRow, LabelTable, read_labels, write_labels
from shards.manifest import (
    LABELS_NAME,
    MANIFEST_NAME,
    REJECTS_NAME,
    SHARDS_DIR,
    Manifest,
    ProcessingParams,
    RunIdentity,
    ShardInfo,
    params_hash,
    read_manifest,
    write_manifest,
)
from shards.qa import QA_FLAGS, QA_RULES, parse_qa_flags, qa_mask, qa_names
from shards.reader import Sample, SampleChecksumError, SampleMeta, ShardChecksumError, iter_samples, read_into
from shards.records import BuildStats, Reject, ShardRecord
from shards.report import CHECKS, Problem, VerifyReport
from shards.scan import ShardScan, scan_shard
from shards.verify import VerifyConfig, VerifyUsageError, verify
from shards.writer import ShardWriter

__all__ = [
    "CHECKS",
    "CLASS_NAMES",
    "POSITIVE_CLASS",
    "FORMAT_VERSION",
    "FORMAT_VERSIONS",
    "QA_FLAGS",
    "QA_RULES",
    "IMAGE_EXT",
    "LABELS_NAME",
    "MANIFEST_NAME",
    "META_EXT",
    "META_FIELDS",
    "REJECTS_NAME",
    "SHARDS_DIR",
    "SPLITS",
    "BuildStats",
    "FormatError",
    "LabelFileError",
    "LabelRow",
    "LabelTable",
    "Letterbox",
    "Manifest",
    "Problem",
    "ProcessingParams",
    "Reject",
    "RunIdentity",
    "Sample",
    "SampleChecksumError",
    "SampleMeta",
    "ShardChecksumError",
    "ShardInfo",
    "ShardRecord",
    "ShardScan",
    "ShardWriter",
    "VerifyConfig",
    "VerifyReport",
    "VerifyUsageError",
    "boxes_from_letterbox",
    "boxes_to_letterbox",
    "check_key",
    "check_member_name",
    "decode_image",
    "decode_meta",
    "encode_image",
    "encode_meta",
    "iter_samples",
    "key_for",
    "letterbox_geometry",
    "params_hash",
    "read_into",
    "parse_qa_flags",
    "qa_mask",
    "qa_names",
    "read_label_csv",
    "read_labels",
    "read_manifest",
    "scan_shard",
    "shard_name",
    "split_member",
    "verify",
    "write_labels",
    "write_manifest",
]
