"""Running the ingest's tasks on the cluster so that no worker death can stop the run.

Dask would retry a task whose worker died on three more workers and then raise
``KilledWorker`` into the driver, ending the run. Here the scheduler fails such a task at once
(``allowed-failures`` 0), Dask retries nothing by itself, and the driver observes what happened
(:class:`ingest.retry.Event`) and carries out the step :mod:`ingest.retry` decides: shards in
:func:`build_shards`, headers in :func:`read_tags`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import sys
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TypeVar

import dask
from distributed import Client, Future, KilledWorker, as_completed
from tqdm import tqdm

from ingest.announce import STARTED_TOPIC
from ingest.cluster import open_client
from ingest.config import IngestConfig
from ingest.dicom_read import describe
from ingest.journal import reusable_record
from ingest.plan import Reject, ShardTask
from ingest.retry import ISOLATED_TRIES, Event, Step, Tries, event_of_error, next_shard_step, next_tag_step
from ingest.tags import BATCH, NOTE_SHARD, TagResult, load_cached, read_patient_ids, save_cache
from ingest.watchdog import read_suspects
from ingest.worker import abandon_shard, build_shard, build_shard_isolated
from shards.archive import ArchiveIndex
from shards.diskspace import NoSpace
from shards.writer import wait_flushed
from shards.records import ShardRecord

log = logging.getLogger(__name__)

SCHEDULER_CONFIG = {
    # A worker death fails its tasks at once (KilledWorker) instead of dask retrying them on
    # three more workers: the driver decides what the death means.
    "distributed.scheduler.allowed-failures": 0,
}
POISON_REASONS = ("worker_crashed", "sample_timeout")
"""Rejects the driver also logs: the files that killed or hung a worker."""

Job = TypeVar("Job")


class _KilledWorkerFilter(logging.Filter):
    """Hide the scheduler's "marked as failed because N workers died": the driver handles
    every such death and logs what it does instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "workers died" not in str(record.msg)


@contextlib.contextmanager
def cluster(cfg: IngestConfig) -> Iterator[Client]:
    """The configured cluster with the scheduler settings above; see :func:`open_client`."""
    quiet = _KilledWorkerFilter()
    scheduler_log = logging.getLogger("distributed.scheduler")
    scheduler_log.addFilter(quiet)
    try:
        with dask.config.set(SCHEDULER_CONFIG), open_client(cfg) as client:
            yield client
    finally:
        scheduler_log.removeFilter(quiet)


def lazy_client(cfg: IngestConfig, stack: contextlib.ExitStack) -> Callable[[], Client]:
    """A function giving the configured cluster's client, which starts the cluster (entered on
    ``stack``) at its first call: a run starts no cluster until there is work for it."""
    opened: list[Client] = []

    def client() -> Client:
        if not opened:
            opened.append(stack.enter_context(cluster(cfg)))
        return opened[0]

    return client


def drive(
    client: Client,
    jobs: list[Job],
    submit: Callable[[Job], Future],
    finish: Callable[[Job, Future], list[Job]],
) -> None:
    """Run ``jobs``; ``finish(job, future)`` handles a finished task and returns the jobs to
    run next (the same one again, or its parts)."""
    job_of: dict[str, Job] = {}
    futures = []
    for job in jobs:
        future = submit(job)
        job_of[future.key] = job
        futures.append(future)
    running = as_completed(futures)
    for future in running:
        job = job_of.pop(future.key)
        follow = finish(job, future)
        # Let the scheduler forget the result: a lost worker then costs only its in-flight
        # task, not the results it already handed over.
        future.release()
        for nxt in follow:
            again = submit(nxt)
            job_of[again.key] = nxt
            running.add(again)


def _starts(client: Client) -> list[dict[str, str]]:
    """The start announcements of the run's tasks so far, in order (``announce_start``)."""
    return [msg for _, msg in client.get_events(STARTED_TOPIC)]


def _started(starts: list[dict[str, str]], key: str) -> bool:
    """True if the task ``key`` announced that it started."""
    return any(msg.get("key") == key for msg in starts)


def _last_started_on(starts: list[dict[str, str]], worker: str | None) -> str | None:
    """The key of the task that announced its start on ``worker`` last: with one thread per
    worker, the one running there when it died, unless its own announcement was lost."""
    if worker is None:
        return None
    return next((msg.get("key") for msg in reversed(starts) if msg.get("worker") == worker), None)


@dataclasses.dataclass
class _ShardState:
    """What the driver knows about one pending shard."""

    task: ShardTask
    known: dict[str, Reject]
    """Poison files found so far (watchdog notes), rejected without being opened again."""
    tries: Tries = dataclasses.field(default_factory=Tries)
    attempt: int = 0


def _submit_shard(client: Client, cfg: IngestConfig, state: _ShardState) -> Future:
    state.attempt += 1
    isolated = state.tries.isolated
    fn = build_shard_isolated if isolated else build_shard
    key = f"shard-{state.task.name}-{state.task.processing.size}-{'isolated-' if isolated else ''}{state.attempt}"
    return client.submit(fn, state.task, cfg.sample_timeout, state.known, key=key, pure=False, retries=0)


def _death_event(cfg: IngestConfig, client: Client, key: str, state: _ShardState,
                 worker: str | None, finished: Collection[str]) -> Event:
    """What the death of ``worker`` while it held ``state``'s shard means; new watchdog notes
    join ``state.known``.

    ``finished``: keys whose results arrived.
    """
    notes = read_suspects(cfg.out, state.task.name)
    new = {p: r for p, r in notes.items() if p not in state.known}
    if new:
        state.known.update(new)
        return Event.NOTED
    starts = _starts(client)  # one round trip to the scheduler for both questions
    if _started(starts, key):
        return Event.CRASHED
    culprit = _last_started_on(starts, worker)
    behind = culprit is not None and culprit != key and culprit not in finished
    return Event.QUEUED_BEHIND if behind else Event.QUEUED


def _log_step(state: _ShardState, event: Event, step: Step, error: BaseException | None = None) -> None:
    name = state.task.name
    if step is Step.DROP_NOTED:
        for rej in state.known.values():
            log.warning("shard %s: %s: %s (%s); rebuilding the shard without it", name, rej.path, rej.reason, rej.detail)
    elif step is Step.RESUBMIT and event is Event.RAISED:
        log.warning("shard %s: its task raised %s; submitting it again", name, describe(error) if error else "")
    elif step is Step.RESUBMIT:
        log.info("shard %s was queued on a worker that died%s; submitting it again", name,
                 " behind another task" if event is Event.QUEUED_BEHIND else "")
    elif step is Step.RETRY and not state.tries.isolated:
        log.warning("shard %s: its worker died; retrying it once", name)
    elif step is Step.ISOLATE:
        log.warning("shard %s: its worker died again; rebuilding it file by file in isolated processes", name)
    elif step is Step.RETRY:
        log.warning("shard %s: the worker of its isolated rebuild died; trying again", name)


def _shard_outcome(cfg: IngestConfig, client: Client, future: Future, state: _ShardState,
                   finished: Collection[str] = ()) -> ShardRecord | NoSpace | None:
    """The record of a finished shard task (a :class:`~shards.diskspace.NoSpace` if it met a
    full disk); None when it is to be built again; the record of an abandoned shard when its
    workers keep dying.

    Raises:
        Exception: the task's own error, when :func:`ingest.retry.next_shard_step` stops the run.
    """
    try:
        return future.result()
    except KilledWorker as exc:
        done = reusable_record(cfg.out, state.task)
        if done is not None:  # it finished; its worker died before the result was fetched
            return done
        worker = getattr(exc.last_worker, "address", None)
        event = _death_event(cfg, client, str(future.key), state, worker, finished)
    except Exception as exc:
        event = event_of_error(exc)
        state.tries, step = next_shard_step(state.tries, event)
        if step is Step.STOP:
            raise
        _log_step(state, event, step, exc)
        return None
    state.tries, step = next_shard_step(state.tries, event)
    if step is not Step.GIVE_UP:
        _log_step(state, event, step)
        return None
    detail = (f"the workers building shard {state.task.name} died {state.tries.crashes} times, "
              f"{ISOLATED_TRIES} times while decoding its files one by one in isolated processes")
    log.error("shard %s: %s; its files are rejected as worker_crashed", state.task.name, detail)
    return abandon_shard(state.task, detail)


def build_shards(cfg: IngestConfig, client: Client, pending: list[ShardTask], records: dict[str, ShardRecord]) -> None:
    """Build the pending shards; put each one's result record in ``records``.

    Raises:
        OSError: ENOSPC or EDQUOT, at the first shard that met it (not retried: a full disk
            is not transient), or from a shard's write-back once all are built.
    """
    bar = tqdm(total=sum(len(t.samples) for t in pending), unit="img", desc="ingest", disable=not cfg.progress,
               file=sys.stderr, smoothing=0.1)

    finished: set[str] = set()

    def finish(state: _ShardState, future: Future) -> list[_ShardState]:
        record = _shard_outcome(cfg, client, future, state, finished)
        if record is None:
            return [state]
        if isinstance(record, NoSpace):
            raise record.error()
        if future.status == "finished":  # not a task that died (its shard abandoned)
            finished.add(str(future.key))
        records[record.name] = record
        for rej in record.rejects:
            if rej.reason in POISON_REASONS:
                log.warning("%s: %s (%s)", rej.path, rej.reason, rej.detail)
        bar.update(record.info.samples + len(record.rejects))
        return []

    try:
        jobs = [_ShardState(t, read_suspects(cfg.out, t.name)) for t in pending]
        drive(client, jobs, lambda state: _submit_shard(client, cfg, state), finish)
        client.run(wait_flushed)  # a shard whose write-back failed is gone: the error says why
    finally:
        bar.close()


@dataclasses.dataclass
class _TagJob:
    rels: list[str]
    tries: Tries = dataclasses.field(default_factory=Tries)


def read_tags(
    cfg: IngestConfig, client: Callable[[], Client], rels: list[str], archive: ArchiveIndex | None = None
) -> dict[str, TagResult]:
    """The PatientID of each of ``rels`` (or why there is none), read on the workers.

    Args:
        client: Called only when some tag is not cached from an interrupted run.
        archive: The member index when ``--dicom-dir`` is an archive.
    """
    tags = load_cached(cfg.out)
    todo = [r for r in rels if r not in tags]
    if todo:
        log.info("reading the PatientID of %d files (headers only)", len(todo))
        dicom_dir, out = str(cfg.dicom_dir.resolve()), str(cfg.out.resolve())
        jobs = [_TagJob(todo[i : i + BATCH]) for i in range(0, len(todo), BATCH)]
        bar = tqdm(total=len(todo), unit="file", desc="headers", disable=not cfg.progress, file=sys.stderr)
        c = client()

        def submit(job: _TagJob) -> Future:
            part = archive.subset(job.rels) if archive is not None else None
            return c.submit(read_patient_ids, dicom_dir, job.rels, out, cfg.sample_timeout, part, pure=False, retries=0)

        def finish(job: _TagJob, future: Future) -> list[_TagJob]:
            try:
                tags.update(future.result())
            except KilledWorker:
                return _tag_death(cfg, c, str(future.key), job, tags)
            except Exception as exc:
                job.tries, step = next_tag_step(job.tries, event_of_error(exc), len(job.rels))
                if step is Step.STOP:
                    raise
                return [job]
            bar.update(len(job.rels))
            return []

        try:
            drive(c, jobs, submit, finish)
        finally:
            bar.close()
        save_cache(cfg.out, tags)
    return {r: tags[r] for r in rels}


def _tag_death(cfg: IngestConfig, client: Client, key: str, job: _TagJob, tags: dict[str, TagResult]) -> list[_TagJob]:
    """A header-reading task's worker died: the jobs to run next (:func:`ingest.retry.next_tag_step`)."""
    noted = None
    if not _started(_starts(client), key):
        event = Event.QUEUED
    elif len(job.rels) == 1 and (noted := read_suspects(Path(cfg.out), NOTE_SHARD).get(job.rels[0])) is not None:
        event = Event.NOTED
    else:
        event = Event.CRASHED
    job.tries, step = next_tag_step(job.tries, event, len(job.rels))
    if step in (Step.RESUBMIT, Step.RETRY):
        return [job]
    if step is Step.SPLIT:
        log.warning("the worker reading %d headers died; reading them one per task", len(job.rels))
        return [_TagJob([rel]) for rel in job.rels]
    rel = job.rels[0]
    tags[rel] = (None, noted or Reject(rel, "worker_crashed", "the worker reading its header died twice"))
    log.warning("%s: %s (%s)", rel, tags[rel][1].reason, tags[rel][1].detail)  # type: ignore[union-attr]
    return []
