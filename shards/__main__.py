"""``python -m shards``: verify, summarise and look at an ingested dataset.

Subcommands:

OUT is a folder or a URL (``s3://bucket/prefix``, ``http(s)://host/path``, ``file://``); a
remote dataset is copied to a temporary folder (under ``$TMPDIR``) and checked there.
``OUT@vN`` names version N of the dataset (without it: the latest).

* ``verify OUT [--deep] [--source DIR] [--labels CSV] [--workers N] [--json FILE]``:
  exit 0 when everything holds, 1 when problems were found (one line each, then a summary),
  2 for a usage error (OUT missing or not a dataset, unreadable ``--labels``).
* ``stats OUT [--png FILE]``: counts, class balance, boxes, views, rejects.
* ``show OUT KEY [KEY ...] -o FILE.png [--source DIR]``: samples with their boxes drawn;
  ``show OUT --qa FLAG [--count N] [--seed S] -o FILE.png``: samples that carry a QA flag.
* ``versions OUT``: the dataset's versions: number, date, samples, what changed.
* ``withdraw OUT --patients FILE [--pseudonymize KEYFILE]``: erase patients, in a new version.
* ``gc OUT --keep N [--yes]``: delete the shards that no kept version lists (without
  ``--yes``, only say what would go).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from shards.cli import EXIT_USAGE, configure_logging

log = logging.getLogger("shards")

EXIT_OK, EXIT_PROBLEMS = 0, 1


OUT_HELP = "dataset folder or URL (s3://, http(s)://, file://); OUT@vN: version N (default: the latest)"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m shards",
        description="Check, summarise and look at a pneumo-hpc dataset (webdataset shards + labels.zarr).",
    )
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="{verify,stats,show,versions,withdraw,gc}")

    v = sub.add_parser(
        "verify",
        help="prove the shards and labels are complete, uncorrupted and consistent",
        description="Quick (default): manifest, shard files, sizes, sha256, tar structure, keys and counts, in "
        "one pass over each shard's bytes. --deep: also decode every sample and check it against labels.zarr. "
        "--source/--labels: also account for every source file and labelled patient. "
        "Exit 0: all holds; 1: problems found; 2: usage error.",
    )
    v.add_argument("out", metavar="OUT", help=OUT_HELP)
    v.add_argument("--deep", action="store_true", help="decode every sample; check JSON and labels.zarr row by row")
    v.add_argument("--source", type=Path, metavar="DIR", help="the ingested DICOM folder (or .zip / .tar): every file is one sample or one reject")
    v.add_argument("--members", metavar="PREFIX", help="the folder inside a .zip / .tar --source that was ingested")
    v.add_argument("--labels", type=Path, metavar="CSV", help="the ingested labels CSV: every labelled patient is accounted for")
    v.add_argument("--pseudonymize", type=Path, metavar="KEYFILE",
                   help="the key a pseudonymized dataset was made with: --source and --labels are reconciled "
                   "through it (without it they are left out)")
    v.add_argument("--workers", type=int, metavar="N", help="Dask worker processes (default: all cores; 1: in this process)")
    v.add_argument("--json", dest="json_path", type=Path, metavar="FILE", help="also write the report as JSON to this file")
    v.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")

    s = sub.add_parser("stats", help="counts, class balance, boxes, view positions, rejects")
    s.add_argument("out", metavar="OUT", help=OUT_HELP)
    s.add_argument("--png", type=Path, metavar="FILE", help="also draw the distributions into this PNG")

    sh = sub.add_parser("show", help="draw samples with their boxes (and the source DICOM beside them)")
    sh.add_argument("out", metavar="OUT", help=OUT_HELP)
    sh.add_argument("keys", nargs="*", metavar="KEY", help="sample keys (or --qa FLAG)")
    sh.add_argument("--qa", metavar="FLAG", help="draw samples that carry this QA flag (blank, lateral, not_chest, "
                    "burned_in_annotation, low_dynamic_range, small_source, inverted_suspect)")
    sh.add_argument("--count", type=int, default=8, metavar="N", help="with --qa: how many samples, at most")
    sh.add_argument("--seed", type=int, default=0, help="with --qa: which samples (the same seed draws the same)")
    sh.add_argument("-o", "--output", type=Path, required=True, metavar="FILE.png", help="PNG file to write")
    sh.add_argument("--source", type=Path, metavar="DIR", help="the ingested DICOM folder (or .zip / .tar): show the source image beside it")

    vs = sub.add_parser("versions", help="list the dataset's versions: number, date, samples, what changed")
    vs.add_argument("out", metavar="OUT", help="dataset folder or URL (s3://, http(s)://, file://)")

    w = sub.add_parser("withdraw", help="erase patients from every shard, label row and rejects line, in a new version",
                       description="Rewrites only the shards that hold the patients (new shard numbers), drops their "
                       "label rows and rejects lines, and deletes the old shards: every earlier version that listed "
                       "them can no longer be read. The version record counts patients and samples, never ids.")
    w.add_argument("out", type=Path, metavar="OUT", help="dataset folder (a URL is read-only)")
    w.add_argument("--patients", type=Path, required=True, metavar="FILE", help="patient ids, one a line")
    w.add_argument("--pseudonymize", type=Path, metavar="KEYFILE",
                   help="the key a pseudonymized dataset was made with: maps the ids to their pseudonyms")

    g = sub.add_parser("gc", help="delete the shards that no kept version lists",
                       description="Keeps the N latest readable versions; the older ones can no longer be read. "
                       "Without --yes, only says what it would delete.")
    g.add_argument("out", type=Path, metavar="OUT", help="dataset folder (a URL is read-only)")
    g.add_argument("--keep", type=int, required=True, metavar="N", help="versions to keep, the latest included")
    g.add_argument("--yes", action="store_true", help="delete (without it: only list what would go)")
    return p


def _verify(args: argparse.Namespace) -> int:
    from shards.verify import VerifyConfig, VerifyUsageError, verify

    from shards.local_copy import local_copy
    from shards.store import DatasetNotFoundError, RemoteReadError

    try:
        with local_copy(args.out, progress=args.progress) as (out, display):
            cfg = VerifyConfig(out=out, deep=args.deep, source=args.source, members=args.members, labels=args.labels,
                               pseudonymize=args.pseudonymize, workers=args.workers, progress=args.progress)
            report = verify(cfg)
            report.out = display  # name the URL, not the temporary copy
    except (ValueError, VerifyUsageError, DatasetNotFoundError, RemoteReadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for line in report.lines():
        print(line)
    if args.json_path is not None:
        args.json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    return EXIT_OK if report.ok else EXIT_PROBLEMS


def _stats(args: argparse.Namespace) -> int:
    from shards.format import FormatError
    from shards.stats import compute_stats, plot_stats

    from shards.local_copy import local_copy
    from shards.store import RemoteReadError

    try:
        with local_copy(args.out, shards=False) as (out, display):
            stats = compute_stats(out)
            stats.out = display
    except (FileNotFoundError, FormatError, RemoteReadError, ValueError) as exc:  # VersionError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for line in stats.lines():
        print(line)
    if args.png is not None:
        plot_stats(stats, args.png)
        print(f"wrote {args.png}")
    return EXIT_OK


def _show(args: argparse.Namespace) -> int:
    from shards.show import ShowError, qa_examples, show

    if bool(args.keys) == bool(args.qa):
        print("error: name sample keys or --qa FLAG (one of the two)", file=sys.stderr)
        return EXIT_USAGE
    if args.count < 1:
        print(f"error: --count {args.count}: must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    from shards.local_copy import local_copy
    from shards.store import RemoteReadError

    try:
        with local_copy(args.out) as (out, _display):
            keys = qa_examples(out, args.qa, args.count, args.seed) if args.qa else args.keys
            path = show(out, keys, args.output, source=args.source)
    except (ShowError, RemoteReadError, FileNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"wrote {path}")
    return EXIT_OK


def _versions(args: argparse.Namespace) -> int:
    from shards.format import FormatError
    from shards.store import DatasetNotFoundError, RemoteReadError, list_records_from, open_store

    try:
        records = list_records_from(open_store(args.out))
    except (DatasetNotFoundError, RemoteReadError, FormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{'version':>7}  {'date':<25}  {'samples':>7}  change")
    fed_before: list[str] = []
    for r in records:
        what = r.change.describe()
        # A version made before the first ingest named its source in source.sources has only dicom_dir.
        fed = r.manifest.source.get("sources") or [r.manifest.source.get("dicom_dir")]
        if new := [str(s) for s in fed[len(fed_before):] if s is not None]:
            what += f" from {', '.join(new)}"
        fed_before = fed
        if r.unavailable is not None:
            what += f"; unavailable since {r.unavailable.date}: {r.unavailable.reason}"
        print(f"{'v' + str(r.version):>7}  {r.created:<25}  {r.samples:>7}  {what}")
    return EXIT_OK


def _withdraw(args: argparse.Namespace) -> int:
    from shards.format import FormatError
    from shards.pseudonym import KeyFileError
    from shards.store import is_remote
    from shards.withdraw import WithdrawError, read_patient_file, withdraw

    try:
        if is_remote(str(args.out)):
            raise WithdrawError(f"{args.out}: a URL is read-only; withdraw on the folder the dataset is served from")
        ids = read_patient_file(args.patients)
        result = withdraw(args.out, ids, key=args.pseudonymize)
    except (WithdrawError, KeyFileError, FileNotFoundError, FormatError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if result.completed is not None:
        print(f"version {result.completed}: finished its interrupted withdrawal (earlier versions erased, "
              "replaced shards deleted)")
    if result.version is None:
        if result.completed is None:
            print(f"none of the {len(ids)} listed patients is in {args.out}: nothing changed")
        return EXIT_OK
    print(f"version {result.version}: withdrew {result.patients} patients, {result.samples} samples; "
          f"{result.shards_rewritten} shards rewritten")
    if result.versions_unavailable:
        print("versions that can no longer be read: " + ", ".join(f"v{n}" for n in result.versions_unavailable))
    print("copies outside the folder (node caches, other copies) must be purged by hand, or by the next reader "
          "that opens it with --cache-dir")
    return EXIT_OK


def _gc(args: argparse.Namespace) -> int:
    from shards.format import FormatError
    from shards.manifest import read_manifest
    from shards.versions import apply_gc, plan_gc

    try:
        plan = plan_gc(args.out, read_manifest(args.out), args.keep)
    except (FileNotFoundError, FormatError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    verb = "deleted" if args.yes else "would delete"
    for name, size in plan.shards:
        print(f"{verb} shards/{name} ({size} bytes)")
    if plan.dropped:
        print(f"{'dropped' if args.yes else 'would drop'} versions " + ", ".join(f"v{n}" for n in plan.dropped))
    if args.yes:
        apply_gc(args.out, plan, args.keep)
    print(f"{verb} {len(plan.shards)} shards, {plan.bytes} bytes; keeping versions "
          + ", ".join(f"v{n}" for n in plan.kept) + ("" if args.yes else " (run with --yes to delete)"))
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, run the subcommand, return the exit code."""
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose, level=logging.WARNING)
    handlers = {"verify": _verify, "stats": _stats, "show": _show, "versions": _versions, "withdraw": _withdraw,
                "gc": _gc}
    return handlers[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
