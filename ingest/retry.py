"""What the driver does when a task's worker dies or its task raises: one pure function per
kind of task, from what it knows of the task's tries and what just happened to the next step.

The scheduler fails a task whose worker died at once (``allowed-failures`` 0) and Dask retries
nothing by itself (``retries=0``): every try is decided here, and :mod:`ingest.runner` only
observes the event and carries out the step.

Shards (:func:`next_shard_step`): a worker death that left a watchdog note drops the noted file
and builds the shard again; a death while the shard was only queued on that worker is forgiven
a few times; a death while it ran is retried once, then the shard is rebuilt file by file in
isolated processes (:data:`ISOLATED_TRIES` times), then given up (its files ``worker_crashed``).
Header batches (:func:`next_tag_step`): a batch whose worker died is split into one task per
file; a file whose worker died twice, or that hung it, is given up. For both, a task that
raises is submitted again :data:`RAISED_RETRIES` times, then ends the run with its error; a full
disk ends it at once.
"""

from __future__ import annotations

import dataclasses
import enum
import errno

ISOLATED_TRIES = 3
"""Isolated rebuilds of a shard before its files are given up: more than one, because the
worker of an isolated rebuild dies only of causes outside it (another task, the machine)."""
CRASHES_BEFORE_ISOLATION = 2
"""Deaths of a shard's own worker (naming no file) before it is rebuilt in isolation."""
QUEUED_DEATHS = 2
"""Deaths of a worker a task was only queued on that are forgiven before they count, when no
other task is known to have been running there (announcements are delivered before a task goes
on, but a worker can die of other causes, or a scheduler miss an event)."""
QUEUED_BEHIND_DEATHS = 12
"""The same, when another unfinished task had announced its start on that worker last: a shard
queued behind a poison shard's every try meets up to ``CRASHES_BEFORE_ISOLATION +
ISOLATED_TRIES`` deaths that are not its own. Still bounded, in case the other task had in fact
finished there."""
TAG_CRASHES = 2
"""Deaths of a worker reading one file's header before the file is given up."""
RAISED_RETRIES = 3
"""Tries again of a task that raised (an error outside any one file: the shard's own write)."""
DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


class Event(enum.Enum):
    """What happened to a task, as the driver observes it."""

    NOTED = "its worker died and a watchdog note names a file not known before"
    QUEUED = "its worker died while it was only queued there"
    QUEUED_BEHIND = "its worker died while it was queued behind another unfinished task"
    CRASHED = "its worker died while it ran, naming no file"
    RAISED = "the task raised"
    DISK_FULL = "the task raised: no space left on the device, or the quota is full"


class Step(enum.Enum):
    """What the driver does next."""

    RESUBMIT = "submit it again as it was"
    DROP_NOTED = "submit it again without the noted files (their rejects are sample_timeout)"
    RETRY = "submit it again, once more in a worker"
    ISOLATE = "rebuild it file by file in isolated processes"
    SPLIT = "submit each of its files as a task of its own"
    GIVE_UP = "give it up: its files are worker_crashed (or sample_timeout) rejects"
    STOP = "end the run with the task's error"


@dataclasses.dataclass(frozen=True)
class Tries:
    """What the driver counts of one task's tries."""

    crashes: int = 0
    """Deaths of its worker while it ran, naming no file."""
    queued: int = 0
    """Deaths of a worker it was only queued on, forgiven."""
    raised: int = 0
    """Tries that raised."""

    @property
    def isolated(self) -> bool:
        """True once a shard is to be built in isolated processes."""
        return self.crashes >= CRASHES_BEFORE_ISOLATION


def event_of_error(exc: BaseException) -> Event:
    """The event of a task that raised ``exc``."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return Event.DISK_FULL
    return Event.RAISED


def _raised(tries: Tries, event: Event) -> tuple[Tries, Step] | None:
    if event is Event.DISK_FULL:
        return tries, Step.STOP  # every other task would meet the same full disk
    if event is Event.RAISED:
        if tries.raised < RAISED_RETRIES:
            return dataclasses.replace(tries, raised=tries.raised + 1), Step.RESUBMIT
        return tries, Step.STOP
    return None


def _forgiven(tries: Tries, event: Event, limit_behind: int) -> tuple[Tries, Step] | None:
    limit = {Event.QUEUED: QUEUED_DEATHS, Event.QUEUED_BEHIND: limit_behind}.get(event)
    if limit is not None and tries.queued < limit:
        return dataclasses.replace(tries, queued=tries.queued + 1), Step.RESUBMIT
    return None  # not queued, or forgiven often enough: the death counts as its own


def next_shard_step(tries: Tries, event: Event) -> tuple[Tries, Step]:
    """The next step for a shard task after ``event``, and its tries from then on."""
    decided = _raised(tries, event)
    if decided is None and event is Event.NOTED:
        decided = tries, Step.DROP_NOTED
    if decided is None:
        decided = _forgiven(tries, event, QUEUED_BEHIND_DEATHS)
    if decided is not None:
        return decided
    after = dataclasses.replace(tries, crashes=tries.crashes + 1)
    if after.crashes < CRASHES_BEFORE_ISOLATION:
        return after, Step.RETRY
    if after.crashes == CRASHES_BEFORE_ISOLATION:
        return after, Step.ISOLATE
    if after.crashes < CRASHES_BEFORE_ISOLATION + ISOLATED_TRIES:
        return after, Step.RETRY
    return after, Step.GIVE_UP


def next_tag_step(tries: Tries, event: Event, files: int) -> tuple[Tries, Step]:
    """The next step for a header-reading task of ``files`` files after ``event``."""
    decided = _raised(tries, event) or _forgiven(tries, event, QUEUED_DEATHS)
    if decided is not None:
        return decided
    if files > 1:
        return tries, Step.SPLIT
    after = dataclasses.replace(tries, crashes=tries.crashes + 1)
    if event is Event.NOTED or after.crashes >= TAG_CRASHES:
        return after, Step.GIVE_UP
    return after, Step.RETRY
