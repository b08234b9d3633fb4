"""Environment for processes that should meet injected faults (see ``tests/inject/sitecustomize.py``)."""

from __future__ import annotations

import os
from pathlib import Path

INJECT_DIR = Path(__file__).resolve().parent / "inject"
REPO = INJECT_DIR.parent.parent


def fault_env(rules: str, env: dict[str, str] | None = None) -> dict[str, str]:
    """``env`` (default: this process's) with ``PNEUMO_FAULTS=rules`` and the injector first
    on ``PYTHONPATH`` (the repository after it, so that the project imports as here)."""
    base = dict(os.environ if env is None else env)
    path = [str(INJECT_DIR), str(REPO), *filter(None, base.get("PYTHONPATH", "").split(os.pathsep))]
    return {**base, "PYTHONPATH": os.pathsep.join(path), "PNEUMO_FAULTS": rules}
