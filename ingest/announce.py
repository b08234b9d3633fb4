"""Each task tells the scheduler that it runs, so the driver blames a worker's death on the task
that was running there, not on one only queued behind it (:mod:`ingest.retry`)."""

from __future__ import annotations

from distributed import get_worker
from distributed.utils import sync

STARTED_TOPIC = "pneumo-ingest-started"
"""Dask event topic on which each task says that it runs (see :func:`announce_start`)."""


def announce_start() -> None:
    """Tell the scheduler that this task now runs, and on which worker.

    A direct call, answered before the task goes on: ``Worker.log_event`` only queues the event
    for the worker's next batched message, which a task that kills its worker at once takes
    down with it.
    """
    try:
        worker = get_worker()
    except ValueError:
        return  # called outside a Dask worker (tests, the driver)
    msg = {"key": str(worker.get_current_task()), "worker": worker.address}
    sync(worker.loop, worker.scheduler.log_event, topic=STARTED_TOPIC, msg=msg)
