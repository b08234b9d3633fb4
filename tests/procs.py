"""Running the project's commands from the tests, with stacks when one hangs."""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Sequence

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
