"""What a Dask worker runs: build one whole shard from its planned samples.

A shard is written under a temporary name and renamed when complete; then its record is
journalled (:mod:`ingest.journal`), so a restarted driver skips it.

Poison files: while a file is decoded, the process's watchdog (:mod:`ingest.watchdog`) watches
the clock; a file still busy after ``sample_timeout`` seconds is noted and the process killed.
What the driver does then, and when a worker dies with no note (a segfault, the OOM killer),
is :mod:`ingest.retry`'s; one of its steps is :func:`build_shard_isolated`, which decodes each
file in a child process. Every path writes the same bytes for the same set of rejects: the
samples in plan order.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from ingest import transforms
from ingest.announce import announce_start
from ingest.dicom import DicomRejected, describe
from ingest.inputs import open_inputs, read_input
from ingest.isolate import ChildDied, ChildTimedOut, IsolatedProcess
from ingest.journal import record_done
from ingest.memory import keep_freed_buffers
from ingest.plan import PlannedSample, Reject, ShardTask
from ingest.render import render
from ingest.watchdog import WATCHDOG
from shards.archive import ArchiveIndex, MemberError
from shards.diskspace import NoSpace, is_out_of_space
from shards.geometry import boxes_to_letterbox
from shards.label_csv import LabelProblem
from shards.manifest import SHARDS_DIR, ProcessingParams
from shards.records import BuildStats, ShardRecord
from shards.writer import ShardWriter

log = logging.getLogger(__name__)

# One shard task per worker process is the unit of parallelism: OpenCV's own threads would
# only fight the other workers for the same cores.
cv2.setNumThreads(1)


@dataclasses.dataclass
class ProcessedSample:
    """A sample ready to write: the image, its JSON, its label problems."""

    image: np.ndarray
    meta: dict[str, Any]
    problems: list[LabelProblem]
    fast_path: bool


def process_sample(data: bytes, sample: PlannedSample, processing: ProcessingParams) -> ProcessedSample:
    """Decode one DICOM's bytes and make the training sample (raises DicomRejected)."""
    rendered = render(data, processing)
    image, geom, decoded = rendered.image, rendered.geom, rendered.decoded
    rows, cols = decoded.rows, decoded.cols
    problems: list[LabelProblem] = []
    # By name, the tag is compared here, at no cost; by tag, the plan has compared it already.
    if decoded.patient_id and decoded.patient_id != sample.patient_id:
        problems.append(mismatch(sample.path, decoded.patient_id, sample.patient_id, sample.patient_id))

    boxes_out: list[list[float]] = []
    for x, y, w, h in sample.boxes:
        src = np.array([[x, y, x + w, y + h]], dtype=np.float64)
        clipped = transforms.clip_boxes_xyxy(src, rows, cols)
        if (clipped[0, 2] - clipped[0, 0]) <= 0 or (clipped[0, 3] - clipped[0, 1]) <= 0:
            problems.append(LabelProblem("box_outside_image", f"box {[x, y, w, h]} lies outside {cols}x{rows}; dropped", sample.patient_id, sample.path))
            continue
        if not np.array_equal(clipped, src):
            problems.append(LabelProblem("box_clipped", f"box {[x, y, w, h]} clipped to the {cols}x{rows} image", sample.patient_id, sample.path))
        boxes_out.append([float(v) for v in boxes_to_letterbox(clipped, geom)[0]])

    meta = {
        "key": sample.key,
        "patient_id": sample.recorded_id or sample.patient_id,
        "source": {"path": sample.recorded_path or sample.path, "sha256": hashlib.sha256(data).hexdigest()},
        "split": sample.split,
        "target": sample.target,
        "class": sample.class_name,
        "boxes": boxes_out,
        "transform": geom.to_json(),
        "view_position": decoded.view_position,
        "sex": decoded.sex,
        "age": decoded.age,
        "qa": rendered.qa,
    }
    return ProcessedSample(image, meta, problems, decoded.fast_path)


def mismatch(path: str, tag: str, name_id: str, used: str) -> LabelProblem:
    """The ``patient_id_mismatch`` line of a file whose PatientID tag differs from the id its
    name gives; ``used`` is the one the ingest went by (``--patient-id``)."""
    return LabelProblem(
        "patient_id_mismatch", f"PatientID tag {tag!r} differs from the file-name id {name_id!r}", used, path
    )


def sample_outcome(
    dicom_dir: str, sample: PlannedSample, processing: ProcessingParams, archive: ArchiveIndex | None = None
) -> ProcessedSample | Reject:
    """Read and process one planned sample (a member of ``archive`` when given); every failure
    is a :class:`Reject`, never raised.

    Only a process that dies or hangs escapes this: that is what the watchdog and
    :func:`build_shard_isolated` are for.
    """
    return read_outcome(lambda: read_input(dicom_dir, archive, sample.path), sample, processing)


def read_outcome(read: Callable[[], bytes], sample: PlannedSample, processing: ProcessingParams) -> ProcessedSample | Reject:
    """:func:`sample_outcome`, the file's bytes coming from ``read`` (see :mod:`ingest.readahead`)."""
    try:
        data = read()
    except MemberError as exc:
        return Reject(sample.path, exc.reason, exc.detail)
    except OSError as exc:
        return Reject(sample.path, "unreadable", f"{type(exc).__name__}: {exc}")
    try:
        return process_sample(data, sample, processing)
    except DicomRejected as exc:
        return Reject(sample.path, exc.reason, exc.detail, hashlib.sha256(data).hexdigest())
    except Exception as exc:  # anything else one file raises costs that file, not the run
        # Unforeseen, so as likely ours as the file's: no verdict on its bytes, an append tries it again.
        return Reject(sample.path, "decode_error", describe(exc))


def build_shard(task: ShardTask, timeout_s: float = 300.0, known: dict[str, Reject] | None = None) -> ShardRecord | NoSpace:
    """Build one shard; return (and journal) its record.

    Args:
        task: The planned shard.
        timeout_s: Seconds one file may take; past it the watchdog notes it and kills this
            process.
        known: Files already known to be poison (``sample_timeout``/``worker_crashed``),
            rejected without being opened.

    A full disk or quota is a :class:`~shards.diskspace.NoSpace` instead, and leaves neither
    the shard nor its record.
    """
    announce_start()
    keep_freed_buffers()
    out = Path(task.out)
    known = known or {}
    # The watchdog is armed while the decoder waits for a file's bytes too: a read that hangs
    # is a poison file like a decode that hangs.
    detail = f"still busy after {timeout_s:g} s (--sample-timeout); its worker was restarted"
    with open_inputs(task.dicom_dir, task.archive, [s.path for s in task.samples if s.path not in known]) as files:

        def outcome(sample: PlannedSample) -> ProcessedSample | Reject:
            WATCHDOG.arm(timeout_s, out, task.name, sample.path, detail)
            try:
                return read_outcome(functools.partial(files.next, sample.path), sample, task.processing)
            finally:
                WATCHDOG.disarm()

        return _write_shard(task, outcome, known, isolated=False)


def _isolated_outcome(
    dicom_dir: str, sample: PlannedSample, processing: ProcessingParams, archive: ArchiveIndex | None = None
) -> tuple[Any, ...]:
    """:func:`sample_outcome` as it travels back from the child: plain, picklable values."""
    result = sample_outcome(dicom_dir, sample, processing, archive)
    if isinstance(result, Reject):
        return ("reject", result)
    return ("sample", result.image, result.meta, result.problems, result.fast_path)


def build_shard_isolated(task: ShardTask, timeout_s: float = 300.0, known: dict[str, Reject] | None = None) -> ShardRecord | NoSpace:
    """:func:`build_shard`, each file decoded in a child process: a file whose child dies is a
    ``worker_crashed`` reject, one that takes longer than ``timeout_s`` a ``sample_timeout``.

    The shard's bytes are those :func:`build_shard` writes for the same rejects.
    """
    announce_start()
    with IsolatedProcess() as child:

        def outcome(sample: PlannedSample) -> ProcessedSample | Reject:
            try:
                member = task.archive.subset([sample.path]) if task.archive is not None else None
                got = child.call(_isolated_outcome, task.dicom_dir, sample, task.processing, member, timeout_s=timeout_s)
            except ChildDied as exc:
                return Reject(sample.path, "worker_crashed", f"the process decoding it {exc}")
            except ChildTimedOut:
                return Reject(sample.path, "sample_timeout", f"still busy after {timeout_s:g} s (--sample-timeout); its process was killed")
            if got[0] == "reject":
                return got[1]
            return ProcessedSample(*got[1:])

        return _write_shard(task, outcome, known or {}, isolated=True)


def abandon_shard(task: ShardTask, detail: str) -> ShardRecord | NoSpace:
    """Give up on a shard whose workers keep dying even in isolation: an empty shard, and
    each of its files a ``worker_crashed`` reject (runs in the driver)."""
    return _write_shard(task, lambda s: Reject(s.path, "worker_crashed", detail), {}, isolated=True)


def _write_shard(
    task: ShardTask,
    outcome: Callable[[PlannedSample], ProcessedSample | Reject],
    known: dict[str, Reject],
    isolated: bool,
) -> ShardRecord | NoSpace:
    """:func:`_write_one`; a full disk or quota is returned as :class:`NoSpace`, not raised:
    a full disk is not transient, and a returned value ends the task at once."""
    try:
        return _write_one(task, outcome, known, isolated)
    except OSError as exc:
        if not is_out_of_space(exc):
            raise
        return NoSpace.of(exc)


def _write_one(
    task: ShardTask,
    outcome: Callable[[PlannedSample], ProcessedSample | Reject],
    known: dict[str, Reject],
    isolated: bool,
) -> ShardRecord:
    t0, started, cpu0 = time.perf_counter(), time.time(), time.process_time()
    out = Path(task.out)
    metas: list[dict[str, Any]] = []
    rejects: list[Reject] = []
    problems: list[LabelProblem] = []
    fast = 0
    # Not synced here: a worker's decoding never waits for the disk (the writer's flusher
    # thread does; see ingest.journal.record_done).
    with ShardWriter(out / SHARDS_DIR / task.name, split=task.split, durable=False) as writer:
        for sample in task.samples:
            done = known.get(sample.path) or outcome(sample)
            if isinstance(done, Reject):
                rejects.append(done)
                continue
            writer.write(sample.key, done.image, done.meta)
            metas.append(done.meta)
            problems.extend(done.problems)
            fast += done.fast_path
    assert writer.result is not None
    record = ShardRecord(
        info=writer.result,
        metas=tuple(metas),
        rejects=tuple(rejects),
        problems=tuple(problems),
        stats=BuildStats(
            fast_path=fast,
            isolated=isolated,
            seconds=time.perf_counter() - t0,
            cpu_seconds=time.process_time() - cpu0,
            started=started,
            finished=time.time(),
            worker_pid=os.getpid(),
            max_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        ),
    )
    record_done(out, record)
    return record
