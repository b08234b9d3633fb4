"""The one logging set-up every entry point calls (shards.cli.configure_logging)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import logging, sys
from shards.cli import configure_logging
configure_logging({args})
for name in ("train.loop", "distributed.scheduler"):
    logging.getLogger(name).info("info from %s", name)
    logging.getLogger(name).warning("warning from %s", name)
print("distributed imported" if "distributed" in sys.modules else "no distributed", file=sys.stderr)
"""


def _run(args: str) -> list[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(args=args)], capture_output=True, text=True,
                          env=env, timeout=120, check=True)
    return proc.stderr.splitlines()


@pytest.mark.parametrize("args, prefix, infos, dask", [
    ("rank=0, dask=False", "[rank0] ", ["info from train.loop"], "no distributed"),
    ("rank=1, dask=False", "[rank1] ", [], "no distributed"),
    ("True, rank=0, dask=False", "[rank0] ", ["info from train.loop", "info from distributed.scheduler"],
     "no distributed"),
    ("", "", ["info from train.loop"], "distributed imported"),
], ids=["rank0", "rank1-warnings-only", "verbose", "dask"])
def test_levels_prefix_and_dask_import(args: str, prefix: str, infos: list[str], dask: str) -> None:
    lines = _run(args)
    text = "\n".join(lines)
    ours = [line for line in lines if "from train.loop" in line]
    assert ours and all(line.startswith(prefix) for line in ours), lines
    for name in ("train.loop", "distributed.scheduler"):
        assert (f"info from {name}" in text) == (f"info from {name}" in infos), lines
        assert f"warning from {name}" in text, lines  # warnings always pass, third-party ones too
    assert lines[-1] == dask
