"""The resume journal: each finished shard's record under ``OUT/.ingest/done/``, so that a
restarted driver reuses the shard instead of building it again."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ingest.plan import ShardTask
from ingest.workdir import done_dir
from shards.atomic import atomic_write_text
from shards.manifest import SHARDS_DIR, sha256_file
from shards.records import ShardRecord

log = logging.getLogger(__name__)


def record_done(out: Path, record: ShardRecord) -> None:
    """Journal a shard's record once its file is in place.

    Not synced: a worker's decoding never waits for the disk. The driver syncs every shard
    before it writes the manifest, and :func:`reusable_record` re-hashes what it reuses.
    """
    folder = done_dir(out)
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write_text(folder / f"{record.name}.json", json.dumps(record.to_json()), durable=False)


def reusable_record(out: Path, task: ShardTask) -> ShardRecord | None:
    """The journalled record of a shard already finished (by an earlier, interrupted run, or by
    a task whose result was lost with its worker), if the shard is intact."""
    done = done_dir(out) / f"{task.name}.json"
    shard = Path(out) / SHARDS_DIR / task.name
    try:
        record = ShardRecord.from_json(json.loads(done.read_text()))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # none, cut short, or journalled by another version: built again
    if not shard.is_file() or shard.stat().st_size != record.info.bytes or record.info.xxh3 is None:
        return None  # missing, torn, or built before per-sample checksums (format 1)
    # Neither file is synced when it is written: after a crash the shard can have its size
    # and not its bytes.
    if sha256_file(shard) != record.info.sha256:
        log.warning("%s: its bytes differ from those recorded when it was built (a crash?); rebuilding it", shard)
        return None
    return record
