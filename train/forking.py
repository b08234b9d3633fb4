"""How a rank starts its DataLoader workers without the fork deadlock.

``fork`` copies only the calling thread. The child CPython then frees the states of the
threads that did not come along, and the destructors that runs can wait forever on a lock a
vanished thread held: a loader worker stuck in ``PyOS_AfterFork_Child`` (seen in CI, a
two-rank run hung until its timeout). Python 3.12 warns about every fork of a process with
threads for this reason.

So before a loader forks, :func:`worker_start_method` stops the helper threads this project
starts in a rank and can restart on demand: zarr's I/O loop and its executor (``labels.zarr``
reads); tqdm's monitor thread is never started (:data:`tqdm.tqdm.monitor_interval` is 0 in
:mod:`train.loop`). If other threads are still alive (fsspec's I/O loop after remote reads,
anything a user's code started), the workers come from a fork server instead: one
single-threaded process per rank, started once, that forks each worker.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import threading
from multiprocessing.context import BaseContext

log = logging.getLogger(__name__)

FORKSERVER_PRELOAD = ["train.data"]
"""Imported once in the fork server, so that each worker it forks starts with torch loaded."""
ZARR_STOP_TIMEOUT_S = 10.0

_warned: set[tuple[str, ...]] = set()


def stop_zarr_threads() -> None:
    """Stop zarr's I/O loop thread and its executor threads (zarr starts them again when next
    used)."""
    try:
        from zarr.core import sync
    except ImportError:  # another zarr layout: nothing of ours to stop
        return
    loop = sync.loop[0]
    if loop is None:
        return
    if loop.is_running():
        # The loop's default executor runs zarr's file reads; cleanup_resources() below only
        # closes it without waiting, so wait for its threads here.
        asyncio.run_coroutine_threadsafe(loop.shutdown_default_executor(), loop).result(ZARR_STOP_TIMEOUT_S)
    sync.cleanup_resources()


def other_threads() -> list[str]:
    """Names of this process's live Python threads other than the calling one."""
    me = threading.current_thread()
    return sorted(t.name for t in threading.enumerate() if t is not me and t.is_alive())


def worker_start_method() -> BaseContext | None:
    """The multiprocessing context for this rank's loader workers: None (plain fork) when no
    other thread is left, else a fork server's (see the module docstring)."""
    stop_zarr_threads()
    others = other_threads()
    if not others:
        return None
    key = tuple(others)
    if key not in _warned:
        _warned.add(key)
        log.info("threads alive in this rank (%s): loader workers start from a fork server, "
                 "not by forking it", ", ".join(others))
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx
