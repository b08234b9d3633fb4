"""The watchdog of a worker process: a file that keeps it busy past its deadline is noted, and
the process killed (a task cannot be interrupted from inside its thread).

The note, under ``OUT/.ingest/suspects/`` (:func:`ingest.workdir.suspects_dir`), names the file;
the driver reads it (:func:`read_suspects`) and runs the task again without that file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

from ingest.plan import Reject
from ingest.workdir import suspects_dir
from shards.atomic import atomic_write_text

log = logging.getLogger(__name__)

WATCHDOG_POLL_S = 0.5


class Watchdog:
    """Kills this process when one file keeps it busy past its deadline, after leaving a note
    that names the file."""

    def __init__(self) -> None:
        self._armed: tuple[float, Path, str, str, str] | None = None
        self._thread: threading.Thread | None = None

    def arm(self, timeout_s: float, out: Path, shard: str, path: str, detail: str) -> None:
        """Watch ``path`` of ``shard``, now in work: past ``timeout_s`` leave a
        ``sample_timeout`` note saying ``detail`` under ``out`` (:func:`suspect_note_path`),
        then die. Armed once per file, so the note is made only if it is needed."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="pneumo-sample-watchdog", daemon=True)
            self._thread.start()
        self._armed = (time.monotonic() + timeout_s, out, shard, path, detail)

    def disarm(self) -> None:
        self._armed = None

    def _watch(self) -> None:
        while True:
            time.sleep(WATCHDOG_POLL_S)
            armed = self._armed
            if armed is None or time.monotonic() < armed[0]:
                continue
            _, out, shard, path, detail = armed
            note_path = suspect_note_path(out, shard, path)
            note_path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(note_path, json.dumps({"path": path, "reason": "sample_timeout", "detail": detail}))
            log.error("%s: %s; killing this worker process so that the driver can go on", path, detail)
            os.kill(os.getpid(), signal.SIGKILL)


WATCHDOG = Watchdog()
"""The one watchdog of this process."""


def suspect_note_path(out: Path, shard: str, path: str) -> Path:
    """Where the watchdog notes that ``path`` of ``shard`` kept its worker busy too long."""
    digest = hashlib.sha256(path.encode()).hexdigest()[:16]
    return suspects_dir(out) / f"{shard}.{digest}.json"


def read_suspects(out: Path, shard: str) -> dict[str, Reject]:
    """The notes the watchdog left for ``shard``, as rejects by path."""
    found: dict[str, Reject] = {}
    for note in sorted(suspects_dir(out).glob(f"{shard}.*.json")):
        try:
            rec = json.loads(note.read_text())
            found[rec["path"]] = Reject(rec["path"], rec["reason"], rec["detail"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a note cut short by the kill: the file is found again
    return found
