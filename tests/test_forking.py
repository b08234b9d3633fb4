"""Loader workers never come from a fork of a rank with other threads alive (such a fork can
deadlock the child in CPython; see ``train.forking``): the threads are watched from outside
(``tests/inject/fork_watch.py``) in real two-rank runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from shards.serve import free_port
from tests.fault_injection import INJECT_DIR
from tests.test_train import RUN_TIMEOUT, ok, records, small_args

REPO = Path(__file__).resolve().parents[1]


def watched_run(data: Path, run: Path, forks: Path, **env: str) -> subprocess.CompletedProcess:
    """One epoch (training and evaluation) on two ranks with every fork logged to ``forks``."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "train",
           *small_args(data, run, "classify", "ddp", "--epochs", "1")]
    full_env = {**os.environ, "PYTHONPATH": f"{INJECT_DIR}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1",
                "PNEUMO_FORK_LOG": str(forks), **env}
    return subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT, check=False)


def fork_records(forks: Path) -> list[dict]:
    return [json.loads(line) for line in forks.read_text().splitlines()]


def test_loader_workers_fork_a_rank_with_no_other_thread(ingested_small: Path, tmp_path: Path):
    forks = tmp_path / "forks.jsonl"
    proc = watched_run(ingested_small, tmp_path / "run", forks)
    ok(proc)
    got = fork_records(forks)
    # one worker per rank for training and one for evaluation, at least
    assert len({r["pid"] for r in got}) == 2 and len(got) >= 4, got
    assert all(r["threads"] == ["MainThread"] for r in got), got
    assert "fork server" not in proc.stderr
    assert len(records(tmp_path / "run", "train")) == 5


def test_a_rank_with_a_foreign_thread_starts_workers_from_a_fork_server(ingested_small: Path, tmp_path: Path):
    forks = tmp_path / "forks.jsonl"
    proc = watched_run(ingested_small, tmp_path / "run", forks, PNEUMO_THREAD="1")
    ok(proc)
    assert "threads alive in this rank (injected-idle): loader workers start from a fork server" in proc.stderr
    got = fork_records(forks)
    assert got and all(r["threads"] == ["MainThread"] for r in got), got
    assert len(records(tmp_path / "run", "train")) == 5
    assert records(tmp_path / "run", "eval")
