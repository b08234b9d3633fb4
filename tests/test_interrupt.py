"""Ctrl-C: a real SIGINT to the process group, as a terminal sends it, ends an ingest or a training
run with one line that says how to resume, and exit status 130."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tests.fault_injection import fault_env

REPO = Path(__file__).resolve().parents[1]


def _interrupt(cmd: list[str], env: dict[str, str], ready: Callable[[], bool]) -> subprocess.CompletedProcess:
    """Start ``cmd`` in a session of its own, Ctrl-C its process group once ``ready()``, and
    return how it ended."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _last_line(res: subprocess.CompletedProcess) -> str:
    assert "Traceback" not in res.stderr and "KeyboardInterrupt" not in res.stderr, res.stderr
    return res.stderr.strip().splitlines()[-1]


def test_ctrl_c_ends_an_ingest_with_one_line_and_130(synth_small, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "ingest", "--dicom-dir", str(synth_small.images_dir), "--out", str(out),
           "--labels", str(synth_small.labels_csv), "--size", "64", "--shard-size", "4", "--workers", "2",
           "--no-progress"]
    env = fault_env("*.dcm=sleep:0.125")  # 0.5 s a shard: the Ctrl-C lands mid-run
    res = _interrupt(cmd, env, lambda: len(list((out / ".ingest" / "done").glob("*.json"))) >= 2)
    assert res.returncode == 130, res.stderr
    assert _last_line(res) == "interrupted: the finished shards are kept; run the same command again to resume"
    assert not (out / "manifest.json").exists()

    res = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert re.search(r"shards: \d+ built, [1-9]\d* reused", res.stdout)


def test_ctrl_c_ends_a_training_run_with_one_line_and_130(ingested_small: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "train", "--data", str(ingested_small), "--out", str(run), "--amp", "none",
           "--image-size", "64", "--batch-size", "4", "--workers", "1", "--epochs", "50", "--ckpt-every", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    res = _interrupt(cmd, env, lambda: (run / "checkpoints" / "latest").is_file())
    assert res.returncode == 130, res.stderr[-3000:]
    line = _last_line(res)
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert line.endswith(f"ERROR train: interrupted; run the same command with --resume to continue from {latest}")
