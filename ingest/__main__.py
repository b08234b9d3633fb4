"""``python -m ingest``: DICOM folder -> webdataset shards + labels.zarr + manifest, on Dask."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from ingest.config import IngestConfig
from shards.cli import EXIT_USAGE, configure_logging

log = logging.getLogger("ingest")

EXIT_CLUSTER = 1
EXIT_NO_SPACE = 3
EXIT_INTERRUPTED = 130
"""128 + SIGINT, as a shell reports a command ended by Ctrl-C."""


def build_parser() -> argparse.ArgumentParser:
    d = IngestConfig.__dataclass_fields__
    p = argparse.ArgumentParser(
        prog="python -m ingest",
        description="Turn a folder of chest X-ray DICOMs into CLAHE-enhanced uint8 tensors in "
        "webdataset tar shards plus a zarr label store, on a Dask cluster. Re-running the same "
        "command resumes an interrupted run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dicom-dir", type=Path, required=True,
                   help="folder searched recursively for DICOMs, or a .zip / uncompressed .tar read in place")
    p.add_argument("--members", metavar="PREFIX",
                   help="a folder inside the --dicom-dir archive to ingest, e.g. stage_2_train_images/; without it, the whole archive")
    p.add_argument("--out", type=Path, required=True, help="output dataset folder")
    p.add_argument("--labels", type=Path, help="stage_2_train_labels.csv (omit for an inference set)")
    p.add_argument("--class-info", type=Path, help="stage_2_detailed_class_info.csv")
    p.add_argument("--cluster", choices=("local", "slurm"), default="local", help="Dask LocalCluster or SLURMCluster")
    p.add_argument("--workers", type=int, help="local worker processes (default: all cores)")
    p.add_argument("--jobs", type=int, default=d["jobs"].default, help="Slurm worker jobs (--cluster slurm)")
    p.add_argument("--queue", help="Slurm partition (overrides jobqueue.slurm.queue)")
    p.add_argument("--account", help="Slurm account (overrides jobqueue.slurm.account)")
    p.add_argument("--walltime", help="worker job walltime HH:MM:SS (overrides jobqueue.slurm.walltime)")
    p.add_argument("--worker-timeout", type=float, default=d["worker_timeout"].default, help="seconds to wait for the first worker")
    p.add_argument("--dry-run", action="store_true", help="print the Slurm worker job script and exit")
    p.add_argument("--shard-size", type=int, default=d["shard_size"].default, help="samples per shard")
    p.add_argument("--size", type=int, default=d["size"].default, help="output image side in pixels")
    p.add_argument("--clahe-clip", type=float, default=d["clahe_clip"].default, help="CLAHE clip limit")
    p.add_argument("--clahe-grid", type=int, default=d["clahe_grid"].default, help="CLAHE tiles per side")
    p.add_argument("--resample", choices=("dct", "area"), default=d["resample"].default,
                   help="dct: decode JPEG frames at a reduced n/8 scale, CLAHE at the output size; "
                   "area: full-size decode, CLAHE, area resize")
    p.add_argument("--max-pixels", type=int, default=d["max_pixels"].default,
                   help="reject images with more Rows x Columns (too_large) before decoding them")
    p.add_argument("--val-fraction", type=float, default=d["val_fraction"].default, help="fraction of patients in val")
    p.add_argument("--seed", type=int, default=d["seed"].default, help="seed of the split and shard order")
    p.add_argument("--sample-timeout", type=float, default=d["sample_timeout"].default, metavar="S",
                   help="seconds one file may keep a worker busy before it is rejected (sample_timeout)")
    p.add_argument("--patient-id", choices=("name", "tag"), default=d["patient_id"].default,
                   help="patient id from the file name (RSNA's <id>.dcm) or from the PatientID tag (renamed files)")
    p.add_argument("--pseudonymize", type=Path, metavar="KEYFILE",
                   help="a secret key file (chmod 600): patient ids, keys and paths are written as its "
                   "HMAC-SHA256 pseudonyms; no shard, labels.zarr or manifest holds an id, file name or "
                   "folder (rejects.jsonl keeps paths for the operator)")
    p.add_argument("--sop-classes", choices=("radiograph", "any-image"), default=d["sop_classes"].default,
                   help="radiograph: CR, DX and Secondary Capture images only (other images are not_a_radiograph "
                   "rejects); any-image: every image class. Non-image objects (SEG, SR, PR, ...) are not_an_image rejects")
    p.add_argument("--append", action="store_true",
                   help="add the new files of --dicom-dir to the dataset at --out as a new version "
                        "(same parameters; files already in it are skipped)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    from ingest.cluster_base import ClusterError
    from ingest.pipeline import IngestOutOfSpace, IngestUsageError, run_ingest

    kwargs = {k: v for k, v in vars(args).items() if k != "verbose"}
    try:
        cfg = IngestConfig(**kwargs)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if cfg.dry_run:
        if cfg.cluster != "slurm":
            print("error: --dry-run prints the Slurm job script; add --cluster slurm", file=sys.stderr)
            return EXIT_USAGE
        from ingest.slurm import job_script

        print(job_script(cfg))
        return 0
    try:
        if cfg.append:
            from ingest.append import run_append

            summary = run_append(cfg)
        else:
            summary = run_ingest(cfg)
    except IngestUsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ClusterError as exc:  # no workers: wrong partition, account, interface, ...
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CLUSTER
    except IngestOutOfSpace as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_NO_SPACE
    except KeyboardInterrupt:
        print("interrupted: the finished shards are kept; run the same command again to resume", file=sys.stderr)
        return EXIT_INTERRUPTED
    for line in summary.lines():
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
