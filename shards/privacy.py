"""What leaves a DICOM and its folder for the dataset, where it goes, and what ``--pseudonymize`` makes of it.

Every field below is all that an ingest writes into ``shards/``, ``labels.zarr`` and
``manifest.json`` from the DICOM files, their names and the command line; every other header
field (PatientName, PatientBirthDate, InstitutionName, AccessionNumber,
ReferringPhysicianName, StudyDate, UIDs, ...) is read only to decode the pixels, or not at all.
``rejects.jsonl`` and the scratch folder ``.ingest/`` are operator-facing and keep real paths
and ids: they stay on the ingest cluster (``.ingest/`` is removed when the run completes).

====================================  ==========================================  ===========================================
field                                 where it goes                               with ``--pseudonymize KEYFILE``
====================================  ==========================================  ===========================================
PatientID tag (``--patient-id tag``)  ``patient_id``, ``key``: JSON, zarr;        HMAC-SHA256 pseudonym (32 hex digits)
                                      first/last key: manifest
file name (``--patient-id name``)     the same, as the patient id                 HMAC-SHA256 pseudonym (32 hex digits)
file name and folders under           ``source.path``: JSON                       ``<HMAC of the path>.dcm``
``--dicom-dir``
``--dicom-dir`` path                  ``source.dicom_dir``: manifest              ``hmac:<HMAC of the path>``
``--labels``, ``--class-info`` paths  ``source.labels``, ``source.class_info``:   ``hmac:<HMAC of the path>``; the files'
                                      manifest                                    sha256 beside them
file list (paths and sizes)           ``source.fingerprint`` (sha256): manifest   HMAC-SHA256 instead of sha256
PatientSex                            ``sex``: JSON, zarr                         unchanged
PatientAge                            ``age``: JSON, zarr                         unchanged
ViewPosition                          ``view_position``: JSON, zarr               unchanged
pixel data                            the 640x640 image; its file's sha256:       unchanged
                                      ``source.sha256`` (JSON)
BodyPartExamined, BurnedInAnnotation  only as QA flags (``not_chest``,             unchanged
                                      ``burned_in_annotation``): ``qa`` in JSON,
                                      zarr; never the value
SOPClassUID                           only its verdict: a file refused by it is   unchanged
                                      a ``rejects.jsonl`` line naming the class
====================================  ==========================================  ===========================================

:data:`RECORDED` lists the identifying rows, by name, for the PHI audit test
(``tests/test_privacy.py``), which plants a marker in every field and checks that only these
reach the dataset, and none with a key.
"""

from __future__ import annotations

RECORDED = {
    "patient_id_tag": "PatientID tag, with --patient-id tag",
    "file_name": "file name: the patient id with --patient-id name; source.path always",
    "folder": "folders under --dicom-dir: source.path",
    "dicom_dir": "the --dicom-dir path: manifest source.dicom_dir",
    "labels_path": "the --labels and --class-info paths: manifest source.labels, source.class_info",
}
"""Identifying fields that an ingest without ``--pseudonymize`` writes into the dataset."""
DROPPED = (
    "PatientName",
    "PatientBirthDate",
    "InstitutionName",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyDate",
)
"""Identifying header fields that never reach the dataset (those the PHI audit plants)."""
