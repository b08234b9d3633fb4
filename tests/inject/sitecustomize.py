"""Fault injection for the tests, from outside the production code.

Python imports ``sitecustomize`` at start-up from ``sys.path``; a test that puts this folder
on ``PYTHONPATH`` (see :mod:`tests.fault_injection`) gets, in every Python process it starts
(the ingest CLI, LocalCluster worker processes, Slurm worker jobs, their children), an
``open()`` and an ``os.open()`` that misbehave on the files named in ``PNEUMO_FAULTS``:

    PNEUMO_FAULTS="a.dcm=segv,b.dcm=sleep:60,*.dcm=sleep:0.1"

Each rule is ``GLOB=ACTION`` matched against the file's name (first match wins); actions:
``segv`` (SIGSEGV, a crashing C decoder), ``kill`` (SIGKILL, the OOM killer), ``exit``
(``os._exit(3)``), ``sleep:S`` (a decoder busy for S seconds), ``errno:NAME`` (an ``OSError``
of that errno, e.g. ``errno:ENOSPC`` for a full disk). Without ``PNEUMO_FAULTS`` this
module does nothing.

``PNEUMO_KILL`` SIGKILLs a torchrun rank at a named function instead: see :mod:`rank_killer`.
``PNEUMO_WRITEBACK=EDQUOT`` fails every ``os.fdatasync`` with that errno: see :mod:`writeback`.
``PNEUMO_FORK_LOG`` records the threads alive at each fork, ``PNEUMO_THREAD`` starts an extra
thread in each rank: see :mod:`fork_watch`.
"""

from __future__ import annotations

import builtins
import fnmatch
import io
import errno
import os
import signal
import time

_RULES = [tuple(rule.split("=", 1)) for rule in os.environ.get("PNEUMO_FAULTS", "").split(",") if "=" in rule]


def _act(action: str) -> None:
    if action == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    elif action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    elif action == "exit":
        os._exit(3)
    elif action.startswith("sleep:"):
        time.sleep(float(action.split(":", 1)[1]))
    elif action.startswith("errno:"):
        code = getattr(errno, action.split(":", 1)[1])
        raise OSError(code, os.strerror(code))


def _meet(file: object) -> None:
    """Act on the first rule whose pattern matches ``file``'s name."""
    if isinstance(file, (str, bytes, os.PathLike)):
        name = os.path.basename(os.fsdecode(file))
        for pattern, action in _RULES:
            if fnmatch.fnmatchcase(name, pattern):
                _act(action)
                break


if _RULES:
    _real_open, _real_os_open = io.open, os.open

    def _faulty_open(file, *args, **kwargs):  # type: ignore[no-untyped-def]
        _meet(file)
        return _real_open(file, *args, **kwargs)

    def _faulty_os_open(path, *args, **kwargs):  # type: ignore[no-untyped-def]
        _meet(path)  # the shard writer opens its files with os.open (O_DIRECT)
        return _real_os_open(path, *args, **kwargs)

    io.open = builtins.open = _faulty_open
    os.open = _faulty_os_open


if os.environ.get("PNEUMO_KILL"):
    import rank_killer

    rank_killer.arm(os.environ["PNEUMO_KILL"])

if os.environ.get("PNEUMO_FORK_LOG") or os.environ.get("PNEUMO_THREAD"):
    import fork_watch

    fork_watch.arm()

if os.environ.get("PNEUMO_WRITEBACK"):
    import writeback

    writeback.arm(os.environ["PNEUMO_WRITEBACK"])
