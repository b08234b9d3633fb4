"""Section ``lifecycle`` of ``python -m shards.bench``: withdrawing patients from a dataset.

On a copy of the bench's dataset (the original stays for the other sections), ``--withdraw``
patients are withdrawn (:func:`shards.withdraw.withdraw`), each from another shard where the
dataset has enough of them: the worst case, one rewritten shard per patient. Reported: the
shards rewritten and the seconds the withdrawal took (shards read, checked and written again,
the label store and records rewritten), then a quick verify of the new version.

Targets: at most one shard rewritten per patient (10 for 10), and seconds, not minutes
(under 60 s).
"""

from __future__ import annotations

import argparse
import shutil
import time

from shards.bench_common import BenchData, Section
from shards.labels import read_labels
from shards.manifest import LABELS_NAME
from shards.verify import VerifyConfig, verify
from shards.withdraw import withdraw

TARGET_SECONDS = 60.0
"""Seconds, not minutes: the withdrawal's wall time the section holds it to."""


def lifecycle_section(data: BenchData, args: argparse.Namespace) -> Section:
    """Withdraw ``args.withdraw`` patients from a copy of the dataset; time it and verify."""
    copy = data.out.parent / "lifecycle-ds"
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(data.out, copy)
    try:
        table = read_labels(copy / LABELS_NAME)
        first_in: dict[int, str] = {}
        for pid, shard in zip(table.patient_id, table.shard):
            first_in.setdefault(int(shard), str(pid))
        chosen = list(first_in.values())[: args.withdraw]
        chosen += [str(p) for p in table.patient_id if str(p) not in chosen][: args.withdraw - len(chosen)]
        t0 = time.perf_counter()
        result = withdraw(copy, chosen)
        seconds = time.perf_counter() - t0
        report = verify(VerifyConfig(out=copy, workers=1, progress=False))
    finally:
        shutil.rmtree(copy, ignore_errors=True)
    sec = Section(f"lifecycle: withdraw {len(chosen)} patients from {data.samples} samples in "
                  f"{len(data.shard_files)} shards", ["measure", "value", "target"])
    sec.rows += [
        ["patients withdrawn", str(result.patients), str(len(chosen))],
        ["samples removed", str(result.samples), ""],
        ["shards rewritten", str(result.shards_rewritten), f"<= {len(chosen)}"],
        ["seconds", f"{seconds:.2f}", f"< {TARGET_SECONDS:.0f}"],
        ["verify of the new version", "OK" if report.ok else f"{len(report.problems)} problems", "OK"],
    ]
    ok = result.shards_rewritten <= len(chosen) and seconds < TARGET_SECONDS and report.ok
    sec.notes.append(f"withdrawal: {'PASS' if ok else 'FAIL'} (at most one shard per patient, under "
                     f"{TARGET_SECONDS:.0f} s, the new version verifies)")
    return sec
