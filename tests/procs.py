"""Running the project's commands from the tests, with stacks when one hangs."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psutil

STACKS_WAIT_S = 3.0


def run_or_dump_stacks(cmd: Sequence[str], *, timeout: float, **popen: object) -> subprocess.CompletedProcess:
    """``subprocess.run(cmd, capture_output=True, text=True)``; past ``timeout`` every process
    of the run (torchrun puts ranks in sessions of their own, so: the process tree) first gets
    SIGUSR1, on which ``python -m train`` prints the stacks of all its threads, then SIGKILL;
    the test fails with the end of that output instead of a bare timeout."""
    proc = subprocess.Popen(list(cmd), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        tree = _children(proc.pid)
        for p in [proc, *tree]:
            _signal(p, signal.SIGUSR1)  # a process without the handler just ends
        time.sleep(STACKS_WAIT_S)
        for p in [proc, *tree]:
            _signal(p, signal.SIGKILL)
        out, err = proc.communicate()
        raise AssertionError(f"{' '.join(cmd[:6])} ... timed out after {timeout} s; its processes' stacks "
                             f"(SIGUSR1) and output:\n{out[-3000:]}\n{err[-30000:]}") from None
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def _children(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def _signal(p: psutil.Process | subprocess.Popen, sig: int) -> None:
    try:
        p.send_signal(sig)
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass


def kill_after_shards(cmd: Sequence[str], out: Path, shards: int, *, env: dict[str, str] | None = None,
                      cwd: Path | str | None = None, wait_s: float = 120.0) -> int:
    """Start the ingest ``cmd`` in a session of its own, wait until ``shards`` shards of ``out``
    are journalled as done (or ``wait_s`` passes), then SIGKILL the whole session: the driver and
    its local workers, mid-run.

    Returns:
        the shards journalled as done when the kill landed.
    """
    proc = subprocess.Popen(list(cmd), cwd=cwd, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done = out / ".ingest" / "done"
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline and len(list(done.glob("*.json"))) < shards:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    return len(list(done.glob("*.json")))
