"""Run one call at a time in a child Python process, so that a call that kills or hangs its
process costs only that call.

Hand-written because Dask's workers are daemonic processes, which multiprocessing (and so
pebble and loky, built on it) refuses to give children; a plain subprocess it allows.

A shard whose Dask worker died twice is rebuilt through an :class:`IsolatedProcess`: each
file is decoded in the child; when the child dies (a segfault in a C decoder, the OOM killer,
``os._exit``) the file in flight is the culprit, and when it does not answer within the
timeout the parent kills it. Either way a fresh child takes the next file.

Calls and results travel pickled over two pipes (the child's stdin, and a dedicated pipe so
that anything a library prints on stdout cannot corrupt them), each message framed by its
8-byte length. ``python -m ingest.isolate FD`` is the child.
"""

from __future__ import annotations

import os
import pickle
import select
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

_LEN = struct.Struct("<Q")
READY = "ready"
START_TIMEOUT_S = 120.0
"""Time a new child may take to import its modules (cold caches on a shared filesystem)."""
PRELOAD = "ingest.worker"
"""Module the child imports before it says it is ready, so that a call's timeout is not
spent on imports."""


class ChildDied(RuntimeError):
    """The child process ended while running a call; the message says how (signal, exit code)."""


class ChildTimedOut(TimeoutError):
    """The child did not answer within the call's timeout; it has been killed."""


def describe_exit(returncode: int | None) -> str:
    """``killed by SIGSEGV`` / ``exited with code 3`` for a child's return code."""
    if returncode is None:
        return "vanished"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        hint = " (out of memory?)" if -returncode == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exited with code {returncode}"


def _read_exact(fd: int, n: int, deadline: float | None) -> bytes | None:
    """``n`` bytes from ``fd``; None at end of file; raises TimeoutError past ``deadline``."""
    parts: list[bytes] = []
    while n:
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                raise TimeoutError
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        parts.append(chunk)
        n -= len(chunk)
    return b"".join(parts)


def _read_message(fd: int, deadline: float | None) -> Any:
    head = _read_exact(fd, _LEN.size, deadline)
    if head is None:
        raise EOFError
    body = _read_exact(fd, _LEN.unpack(head)[0], deadline)
    if body is None:
        raise EOFError
    return pickle.loads(body)


def _write_message(f: BinaryIO, obj: Any) -> None:
    body = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    f.write(_LEN.pack(len(body)))
    f.write(body)
    f.flush()


class IsolatedProcess:
    """A child Python process that runs module-level functions one call at a time.

    Example:
        >>> with IsolatedProcess() as child:
        ...     value = child.call(math.sqrt, 2.0, timeout_s=10)
    """

    def __init__(self) -> None:
        self._proc: subprocess.Popen[bytes] | None = None
        self._reply_fd: int | None = None

    def __enter__(self) -> IsolatedProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _start(self) -> None:
        read_fd, write_fd = os.pipe()
        root = str(Path(__file__).resolve().parent.parent)  # the child imports ingest as we did
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), root) if p)
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-m", "ingest.isolate", str(write_fd)],
                stdin=subprocess.PIPE, pass_fds=(write_fd,), env=env,
            )
        finally:
            os.close(write_fd)
        self._reply_fd = read_fd
        try:
            hello = _read_message(read_fd, time.monotonic() + START_TIMEOUT_S)
        except (EOFError, TimeoutError) as exc:
            died = self._end()
            raise ChildDied(f"the isolated process did not start ({died})") from exc
        if hello != READY:
            self._end()
            raise ChildDied(f"the isolated process said {hello!r} instead of {READY!r}")

    def call(self, fn: Callable[..., Any], *args: Any, timeout_s: float) -> Any:
        """``fn(*args)`` in the child; its exception is raised here.

        Raises:
            ChildDied: the child ended during the call (a new one starts on the next call).
            ChildTimedOut: no answer within ``timeout_s``; the child has been killed.
        """
        if self._proc is None:
            self._start()
        assert self._proc is not None and self._proc.stdin is not None and self._reply_fd is not None
        try:
            _write_message(self._proc.stdin, (fn, args))
            status, value = _read_message(self._reply_fd, time.monotonic() + timeout_s)
        except (BrokenPipeError, EOFError) as exc:
            raise ChildDied(self._end()) from exc
        except TimeoutError as exc:
            self._end(kill=True)
            raise ChildTimedOut(f"no answer within {timeout_s:g} s") from exc
        if status == "error":
            raise value
        return value

    def _end(self, kill: bool = False) -> str:
        """Stop the child (at once with ``kill``, else if it has not ended within a second)
        and say how it ended."""
        proc, self._proc = self._proc, None
        if self._reply_fd is not None:
            os.close(self._reply_fd)
            self._reply_fd = None
        if proc is None:
            return "not running"
        if kill:
            proc.kill()
        if proc.poll() is None:
            try:
                proc.wait(timeout=1.0)  # a dying child may need a moment to be reaped
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                return "killed"
        if proc.stdin is not None:
            proc.stdin.close()
        return describe_exit(proc.returncode)

    def close(self) -> None:
        """End the child: it leaves when its stdin closes."""
        if self._proc is not None and self._proc.stdin is not None:
            try:
                self._proc.stdin.close()
            except OSError:
                pass
        self._end()


def _child_main(reply_fd: int) -> None:
    import importlib

    importlib.import_module(PRELOAD)
    reply = os.fdopen(reply_fd, "wb")
    requests = sys.stdin.buffer
    _write_message(reply, READY)
    while True:
        try:
            fn, args = _read_message(requests.fileno(), None)
        except EOFError:
            return
        try:
            out: tuple[str, Any] = ("ok", fn(*args))
        except Exception as exc:  # sent back and raised in the parent
            out = ("error", exc)
        try:
            try:
                _write_message(reply, out)
            except (pickle.PicklingError, TypeError, AttributeError):
                _write_message(reply, ("error", RuntimeError(f"{type(out[1]).__name__}: {out[1]}")))
        except BrokenPipeError:
            os._exit(0)  # the parent is gone (killed with its worker): nobody to answer, nothing to flush


if __name__ == "__main__":
    _child_main(int(sys.argv[1]))
