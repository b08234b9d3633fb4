"""A second version for tests: another dataset's shards added to one, as an append adds them.

The append itself (``python -m ingest --append``) belongs to the ingest; this helper makes the
same kind of version from two finished ingests (same parameters, other patients), so the
version machinery (records, ``OUT@vN``, gc, withdraw) is tested on its own.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import numpy as np

from shards.format import SHARD_NAME, SPLITS, shard_name
from shards.labels import LabelTable, read_labels
from shards.manifest import LABELS_NAME, REJECTS_NAME, SHARDS_DIR, read_manifest
from shards.versions import Change, VersionRecord, commit_version, save_current


def add_version(out: Path, other: Path) -> VersionRecord:
    """Copy ``other``'s shards into ``out`` under new numbers and commit a version that lists
    ``out``'s shards then those (labels and rejects concatenated, counts summed)."""
    base, extra = read_manifest(out), read_manifest(other)
    parent = save_current(out, base)
    used = {split: -1 for split in SPLITS}
    for p in (out / SHARDS_DIR).iterdir():
        if m := SHARD_NAME.match(p.name):
            used[m.group(1)] = max(used[m.group(1)], int(m.group(2)))
    added = []
    for info in extra.shards:
        used[info.split] += 1
        name = shard_name(info.split, used[info.split])
        shutil.copyfile(other / SHARDS_DIR / info.name, out / SHARDS_DIR / name)
        added.append(dataclasses.replace(info, name=name))
    a, b = read_labels(out / LABELS_NAME), read_labels(other / LABELS_NAME)
    cols = {}
    for f in dataclasses.fields(LabelTable):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if f.name == "shard":
            y = y + len(base.shards)
        elif f.name == "box_offsets":
            x, y = x[:-1], y + x[-1]
        cols[f.name] = np.concatenate([x, y])
    table = LabelTable(**cols)
    counts = dict(base.counts)
    for k in ("samples", "positives", "boxes", "inputs", "rejects", "label_problems"):
        counts[k] = base.counts.get(k, 0) + extra.counts.get(k, 0)
    for split in SPLITS:
        counts[split] = {k: base.counts[split][k] + extra.counts[split][k] for k in base.counts[split]}
    for k in ("rejects_by_reason", "label_problems_by_reason"):
        merged = dict(base.counts.get(k, {}))
        for reason, n in extra.counts.get(k, {}).items():
            merged[reason] = merged.get(reason, 0) + n
        counts[k] = dict(sorted(merged.items()))
    lines = [*(out / REJECTS_NAME).read_text().splitlines(True), *(other / REJECTS_NAME).read_text().splitlines(True)]
    manifest = dataclasses.replace(base, shards=[*base.shards, *added], counts=counts)
    change = Change(kind="append", patients=len(set(b.patient_id)), samples=len(b),
                    shards_added=tuple(s.name for s in added))
    return commit_version(out, parent, manifest, table, lines, change)
