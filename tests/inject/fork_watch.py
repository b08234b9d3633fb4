"""Watch the forks of a process, from outside the production code (see ``sitecustomize``).

``PNEUMO_FORK_LOG=FILE`` appends one JSON line per ``os.fork`` of any Python process that
inherits it: the forking pid, its ``sys.argv[0]`` and the names of the Python threads alive at
that moment (a fork of a process with other threads can deadlock the child: ``train.forking``).

``PNEUMO_THREAD=1`` starts an idle thread in each torchrun rank at start-up (a thread some
library of the user's could have started), then drops the variable so that the processes
the rank spawns do not start one too.
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time


def _log_fork(path: str) -> None:
    names = sorted(t.name for t in threading.enumerate())
    with open(path, "a") as f:  # one short write: lines from concurrent forks stay whole
        f.write(json.dumps({"pid": os.getpid(), "argv0": sys.argv[0] if sys.argv else "", "threads": names}) + "\n")


def arm() -> None:
    path = os.environ.get("PNEUMO_FORK_LOG")
    if path:
        os.register_at_fork(before=lambda: _log_fork(path))
    if os.environ.get("PNEUMO_THREAD") and "LOCAL_RANK" in os.environ:
        del os.environ["PNEUMO_THREAD"]
        threading.Thread(target=lambda: time.sleep(1e9), name="injected-idle", daemon=True).start()
