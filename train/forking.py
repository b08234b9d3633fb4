"""How a rank starts its DataLoader workers: from a fork server, never by forking itself.

``fork`` copies only the calling thread, and the child CPython then deletes the thread states
of every other thread of the parent. A rank has such threads that ``threading`` never lists:
gloo's and NCCL's threads run Python callbacks of DDP and FSDP (each gets a thread state of its
own), besides zarr's I/O loop, fsspec's, tqdm's monitor and the loader's queue feeders. A child
forked while one of them is inside the interpreter blocks for ever on a lock in
``_PyThreadState_DeleteExcept``: its rank waits for a batch that never comes, the other ranks
in a collective. No check in the rank can see every such thread, so no worker is forked from a
rank: each rank starts one fork server (a single-threaded process, ``train.data`` imported
once) the first time it needs workers, and the fork server forks each worker. Python 3.14 makes
the same choice its default on Linux.

A fork server's worker needs one thing more: torch's own watchdog ends a worker when the
worker's *parent* dies, which here is the fork server, and the fork server lives as long as any
process it started. The workers of a SIGKILLed rank (a lost rank that torchrun restarts) would
live on, with their fork server, holding the job's output pipes: :func:`exit_with_rank` (each
worker's ``worker_init_fn``) ends a worker when the rank that started it ends.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import threading
from multiprocessing.context import BaseContext

FORKSERVER_PRELOAD = ["train.data"]
"""Imported once in the fork server, so that each worker it forks starts with torch loaded."""


def worker_context() -> BaseContext:
    """The multiprocessing context of every loader's workers (see the module docstring)."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(FORKSERVER_PRELOAD)
    return ctx


def exit_with_rank(worker_id: int) -> None:
    """``worker_init_fn`` of every loader: end this worker as soon as its rank ends."""
    rank = multiprocessing.parent_process()  # the process that started this one: the rank
    if rank is None:
        return
    threading.Thread(target=_exit_when_gone, args=(rank.sentinel,), name="exit-with-rank", daemon=True).start()


def _exit_when_gone(sentinel: int) -> None:
    multiprocessing.connection.wait([sentinel])  # readable once the rank's end of it is closed
    os._exit(1)
