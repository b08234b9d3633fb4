"""No loader worker is forked from a rank (a fork of a process with other threads can deadlock
the child in CPython; see ``train.forking``): every fork is watched from outside
(``tests/inject/fork_watch.py``) in a real two-rank run whose ranks carry an extra thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tools.serve import free_port
from tests.fault_injection import INJECT_DIR
from tests.procs import run_or_dump_stacks
from tests.test_train import RUN_TIMEOUT, ok, records, small_args

REPO = Path(__file__).resolve().parents[1]


def test_loader_workers_come_from_a_fork_server_not_from_the_rank(ingested_small: Path, tmp_path: Path):
    forks, run = tmp_path / "forks.jsonl", tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "train",
           *small_args(ingested_small, run, "classify", "ddp", "--epochs", "1")]
    env = {**os.environ, "PYTHONPATH": f"{INJECT_DIR}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1",
           "PNEUMO_FORK_LOG": str(forks), "PNEUMO_THREAD": "1"}
    proc: subprocess.CompletedProcess = run_or_dump_stacks(cmd, timeout=RUN_TIMEOUT, cwd=REPO, env=env)
    ok(proc)
    assert len(records(run, "train")) == 5 and records(run, "eval")
    got = [json.loads(line) for line in forks.read_text().splitlines()]
    # a training and an evaluation worker per rank, at least; none forked by a rank
    assert len(got) >= 4, got
    assert not [r for r in got if r["argv0"].endswith(os.path.join("train", "__main__.py"))], got
    assert all(r["threads"] == ["MainThread"] for r in got), got
