"""Datasets as earlier format versions wrote them, made from a current one."""

from __future__ import annotations

import json
from pathlib import Path

from shards.manifest import MANIFEST_NAME


def as_format_1(dataset: Path) -> None:
    """Rewrite ``dataset``'s manifest in place as format 1 wrote it: no per-sample checksums
    (the shards, labels and everything else are the same bytes in both versions)."""
    path = dataset / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["format_version"] = 1
    for shard in data["shards"]:
        del shard["xxh3"]
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
