"""Background reader threads for one worker's lanes (:class:`LaneThreads`).

Reading a sample is almost all work that runs without the GIL: the compiled read loop
(:mod:`shards._fastread`) reads runs of samples into their batch rows, checks their headers and
hashes them with the GIL released. Lanes are independent (each fills its own rows of a batch),
so a worker can read them on threads of their own: on two cores two lanes are read at once,
and the consumer's own work (the training step) overlaps both. :class:`InlineLanes` is the
same interface with no threads.

What the consumer sees does not change. It waits for step ``s`` until every lane has filled
``s``, and a lane that failed raises its error when the consumer reaches the first step that
lane could not fill, the lowest lane first: the same error at the same step as filling the
lanes one after another in the consumer's thread. No thread writes into a batch the consumer
has been given (a sample is read into the first step that wants it; copies go to later ones),
and each thread runs at most ``ahead`` steps in front of the consumer, which bounds the batch
memory in flight.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

__all__ = ["Fill", "InlineLanes", "LaneThreads"]


class Fill(Protocol):
    """One lane's reader (:class:`train.data._LaneFill`)."""

    def fill(self, step: int) -> None: ...

    def finish(self) -> None: ...


class InlineLanes:
    """:class:`LaneThreads`' interface with no threads: each step's lanes are filled in the
    caller's thread, one after another, when it waits for that step."""

    def __init__(self, fills: Sequence[Fill]) -> None:
        self._fills = fills

    def wait(self, step: int) -> None:
        for fill in self._fills:
            fill.fill(step)

    def wait_finished(self) -> None:
        for fill in self._fills:
            fill.finish()

    def close(self) -> None:
        pass


class LaneThreads:
    """Fill ``fills`` for steps ``first..steps-1`` on ``threads`` background threads.

    Lane ``j`` is read by thread ``j % threads``, in step order, lane by lane within a step.
    Call :meth:`wait` before using a step, :meth:`wait_finished` after the last step, and
    :meth:`close` in every case (it stops and joins the threads).
    """

    def __init__(self, fills: Sequence[Fill], first: int, steps: int, *, threads: int, ahead: int) -> None:
        if threads < 1:
            raise ValueError(f"threads={threads}: must be >= 1")
        self._fills, self._first, self._steps, self._ahead = fills, first, steps, max(ahead, 0)
        self._cond = threading.Condition()
        self._filled = [first - 1] * len(fills)
        """The last step each lane has filled."""
        self._finished = [False] * len(fills)
        self._errors: list[BaseException | None] = [None] * len(fills)
        self._consumer = first
        self._stop = False
        threads = min(threads, len(fills)) or 1
        self._threads = [
            threading.Thread(target=self._run, args=(range(t, len(fills), threads),),
                             name=f"lane-reader-{t}", daemon=True)
            for t in range(threads)
        ]
        for t in self._threads:
            t.start()

    def _run(self, lanes: range) -> None:
        live = list(lanes)
        for step in range(self._first, self._steps):
            with self._cond:
                while not self._stop and step > self._consumer + self._ahead:
                    self._cond.wait()
                if self._stop:
                    return
            for j in list(live):
                if not self._call(j, step):
                    live.remove(j)
            if not live:
                return
        for j in live:
            self._call(j, None)

    def _call(self, j: int, step: int | None) -> bool:
        """Fill lane ``j``'s ``step`` (None: read it to its end); False if it failed."""
        try:
            if step is None:
                self._fills[j].finish()
            else:
                self._fills[j].fill(step)
        except BaseException as exc:  # handed to the consumer, which raises it in its thread
            with self._cond:
                self._errors[j] = exc
                self._cond.notify_all()
            return False
        with self._cond:
            if step is None:
                self._finished[j] = True
            else:
                self._filled[j] = step
            self._cond.notify_all()
        return True

    def wait(self, step: int) -> None:
        """Return once every lane has filled ``step``; raise the error of the lowest lane
        that could not."""
        with self._cond:
            self._consumer = step
            self._cond.notify_all()
            for j in range(len(self._fills)):
                while self._filled[j] < step:
                    self._raise_or_wait(j)

    def wait_finished(self) -> None:
        """Return once every lane has been read to its end (format 1: its last checksum)."""
        with self._cond:
            self._consumer = self._steps
            self._cond.notify_all()
            for j in range(len(self._fills)):
                while not self._finished[j]:
                    self._raise_or_wait(j)

    def _raise_or_wait(self, j: int) -> None:
        error = self._errors[j]
        if error is not None:
            raise error
        self._cond.wait()

    def close(self) -> None:
        """Stop the threads after the step each is reading, and join them."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        for t in self._threads:
            if t is not threading.current_thread():
                t.join()
