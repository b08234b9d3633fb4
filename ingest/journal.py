"""The resume journal: each finished shard's record under ``OUT/.ingest/done/``, so that a
restarted driver reuses the shard instead of building it again."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from ingest.plan import ShardTask
from ingest.workdir import done_dir
from shards.atomic import atomic_write_text
from shards.manifest import SHARDS_DIR, sha256_file

log = logging.getLogger(__name__)


def record_done(out: Path, record: dict[str, Any]) -> None:
    """Journal a shard's record once its file is in place.

    Not synced: a worker's decoding never waits for the disk. The driver syncs every shard
    before it writes the manifest, and :func:`reusable_record` re-hashes what it reuses.
    """
    folder = done_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{record['name']}.json", json.dumps(record), durable=False)


def reusable_record(out: Path, task: ShardTask) -> dict[str, Any] | None:
    """The journalled record of a shard already finished (by an earlier, interrupted run, or by
    a task whose result was lost with its worker), if the shard is intact."""
    done = done_dir(out) / f"{task.name}.json"
    shard = Path(out) / SHARDS_DIR / task.name
    try:
        record = json.loads(done.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not shard.is_file() or shard.stat().st_size != record.get("bytes") or "xxh3" not in record:
        return None  # missing, torn, or built before per-sample checksums (format 1)
    # Neither file is synced when it is written: after a crash the shard can have its size
    # and not its bytes.
    if sha256_file(shard) != record.get("sha256"):
        log.warning("%s: its bytes differ from those recorded when it was built (a crash?); rebuilding it", shard)
        return None
    return record
