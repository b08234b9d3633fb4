"""The driver's retry policy (``ingest.retry``): every path from a task's tries and one event
to the next step, as tables."""

from __future__ import annotations

import errno

import pytest

from ingest.retry import (
    CRASHES_BEFORE_ISOLATION,
    ISOLATED_TRIES,
    QUEUED_BEHIND_DEATHS,
    QUEUED_DEATHS,
    RAISED_RETRIES,
    Event,
    Step,
    Tries,
    event_of_error,
    next_shard_step,
    next_tag_step,
)

E, S, T = Event, Step, Tries


@pytest.mark.parametrize(
    "tries, event, expected_tries, step",
    [
        (T(), E.CRASHED, T(crashes=1), S.RETRY),
        (T(crashes=1), E.CRASHED, T(crashes=2), S.ISOLATE),
        (T(crashes=2), E.CRASHED, T(crashes=3), S.RETRY),
        (T(crashes=4), E.CRASHED, T(crashes=5), S.GIVE_UP),
        (T(), E.QUEUED, T(queued=1), S.RESUBMIT),
        (T(queued=QUEUED_DEATHS), E.QUEUED, T(queued=QUEUED_DEATHS, crashes=1), S.RETRY),
        (T(queued=QUEUED_DEATHS), E.QUEUED_BEHIND, T(queued=QUEUED_DEATHS + 1), S.RESUBMIT),
        (T(queued=QUEUED_BEHIND_DEATHS), E.QUEUED_BEHIND, T(queued=QUEUED_BEHIND_DEATHS, crashes=1), S.RETRY),
        (T(crashes=1), E.NOTED, T(crashes=1), S.DROP_NOTED),
        (T(crashes=4), E.NOTED, T(crashes=4), S.DROP_NOTED),
        (T(), E.RAISED, T(raised=1), S.RESUBMIT),
        (T(raised=RAISED_RETRIES), E.RAISED, T(raised=RAISED_RETRIES), S.STOP),
        (T(), E.DISK_FULL, T(), S.STOP),
        (T(crashes=2), E.DISK_FULL, T(crashes=2), S.STOP),
    ],
    ids=[
        "crash-once-retries-in-a-worker",
        "crash-twice-isolates",
        "isolated-rebuild-crashes-tries-again",
        "isolated-rebuilds-all-crash-gives-up",
        "queued-on-a-dying-worker-resubmits",
        "queued-deaths-past-the-limit-count-as-its-own",
        "queued-behind-a-dying-task-forgiven-longer",
        "queued-behind-past-its-limit-counts",
        "timeout-note-drops-the-file",
        "timeout-note-while-isolated-drops-the-file",
        "raised-resubmits",
        "raised-too-often-stops",
        "disk-full-stops-at-once",
        "disk-full-while-isolated-stops",
    ],
)
def test_next_shard_step(tries: Tries, event: Event, expected_tries: Tries, step: Step) -> None:
    assert next_shard_step(tries, event) == (expected_tries, step)


def test_a_shard_that_crashes_every_time_is_isolated_then_given_up() -> None:
    """The whole ladder: one retry, :data:`ISOLATED_TRIES` isolated rebuilds, then given up."""
    tries, steps = T(), []
    while not steps or steps[-1] is not S.GIVE_UP:
        tries, step = next_shard_step(tries, E.CRASHED)
        steps.append(step)
        assert tries.isolated == (tries.crashes >= CRASHES_BEFORE_ISOLATION)
    assert steps == [S.RETRY, S.ISOLATE, *[S.RETRY] * (ISOLATED_TRIES - 1), S.GIVE_UP]


def test_a_shard_queued_behind_a_poison_shard_outlasts_all_its_tries() -> None:
    """A healthy shard queued behind each of a poison shard's tries is never blamed for them."""
    tries = T()
    for _ in range(CRASHES_BEFORE_ISOLATION + ISOLATED_TRIES):
        tries, step = next_shard_step(tries, E.QUEUED_BEHIND)
        assert step is S.RESUBMIT
    assert tries.crashes == 0 and not tries.isolated


@pytest.mark.parametrize(
    "tries, event, files, expected_tries, step",
    [
        (T(), E.QUEUED, 256, T(queued=1), S.RESUBMIT),
        (T(queued=QUEUED_DEATHS), E.QUEUED, 256, T(queued=QUEUED_DEATHS), S.SPLIT),
        (T(), E.QUEUED_BEHIND, 1, T(queued=1), S.RESUBMIT),
        (T(), E.CRASHED, 256, T(), S.SPLIT),
        (T(), E.CRASHED, 1, T(crashes=1), S.RETRY),
        (T(crashes=1), E.CRASHED, 1, T(crashes=2), S.GIVE_UP),
        (T(), E.NOTED, 1, T(crashes=1), S.GIVE_UP),
        (T(), E.RAISED, 256, T(raised=1), S.RESUBMIT),
        (T(raised=RAISED_RETRIES), E.RAISED, 1, T(raised=RAISED_RETRIES), S.STOP),
        (T(), E.DISK_FULL, 256, T(), S.STOP),
    ],
    ids=[
        "batch-queued-resubmits",
        "batch-queued-too-often-splits",
        "file-queued-resubmits",
        "batch-crash-splits",
        "file-crash-once-retries",
        "file-crash-twice-gives-up",
        "file-timeout-gives-up",
        "raised-resubmits",
        "raised-too-often-stops",
        "disk-full-stops",
    ],
)
def test_next_tag_step(tries: Tries, event: Event, files: int, expected_tries: Tries, step: Step) -> None:
    assert next_tag_step(tries, event, files) == (expected_tries, step)


@pytest.mark.parametrize(
    "exc, event",
    [
        (OSError(errno.ENOSPC, "No space left on device"), E.DISK_FULL),
        (OSError(errno.EDQUOT, "Disk quota exceeded"), E.DISK_FULL),
        (OSError(errno.EIO, "Input/output error"), E.RAISED),
        (ValueError("bad"), E.RAISED),
    ],
    ids=["enospc", "edquot", "eio", "not-an-os-error"],
)
def test_event_of_error(exc: BaseException, event: Event) -> None:
    assert event_of_error(exc) is event
