"""SIGKILL a rank of a torchrun job at a chosen call (imported by ``sitecustomize``).

With ``tests/inject`` on ``PYTHONPATH``, ``PNEUMO_KILL`` holds one or more entries separated
by spaces, each ``RANK/ATTEMPT/module:qualname:N[:after]``: in the process with that ``RANK``
on that torchrun attempt (``TORCHELASTIC_RESTART_COUNT``), the N-th call of
``module.qualname`` SIGKILLs the process, before the call (or after it returns with
``:after``). ``PNEUMO_KILL_MARK`` names a file that gets one line per kill, written just
before it. The production code knows nothing of this: the function is wrapped from outside,
as soon as ``module`` has been imported.
"""

from __future__ import annotations

import functools
import importlib.abc
import importlib.util
import os
import signal
import sys


def _wrap(owner: object, name: str, nth: int, after: bool, entry: str) -> None:
    original = getattr(owner, name)
    calls = 0

    def die() -> None:
        mark = os.environ.get("PNEUMO_KILL_MARK")
        if mark:
            with open(mark, "a") as f:
                f.write(f"{entry} pid {os.getpid()}\n")
        os.kill(os.getpid(), signal.SIGKILL)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == nth and not after:
            die()
        result = original(*args, **kwargs)
        if calls == nth and after:
            die()
        return result

    setattr(owner, name, wrapper)


class _PatchAfterImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself; wraps the target module's loader to patch it once executed."""

    def __init__(self, entry: str, module: str, qualname: str, nth: int, after: bool) -> None:
        self.entry, self.module, self.qualname, self.nth, self.after = entry, module, qualname, nth, after

    def find_spec(self, fullname, path, target=None):
        if fullname != self.module:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return None
        exec_module = spec.loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            *path, name = self.qualname.split(".")
            owner = module
            for part in path:
                owner = getattr(owner, part)
            _wrap(owner, name, self.nth, self.after, self.entry)

        spec.loader.exec_module = exec_and_patch
        return spec


def arm(spec: str) -> None:
    """Wrap the functions that ``spec`` names for this process (rank and attempt)."""
    me = (os.environ.get("RANK"), os.environ.get("TORCHELASTIC_RESTART_COUNT"))
    for entry in spec.split():
        rank, attempt, target = entry.split("/", 2)
        if (rank, attempt) != me:
            continue
        module, qualname, nth, *when = target.split(":")
        sys.meta_path.insert(0, _PatchAfterImport(entry, module, qualname, int(nth), when == ["after"]))

