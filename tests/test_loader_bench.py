"""``python -m train.bench --loader-only`` at a toy size: every loader's line and ratio printed
(a smoke test, not a timing). The peers run only where their environment was already made:
the test never makes it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from train.peer_bench import PeersUnavailable, peers_python, table

ROOT = Path(__file__).resolve().parents[1]


def _peers_ready() -> bool:
    try:
        peers_python(create=False)
    except PeersUnavailable:
        return False
    return True


@pytest.mark.parametrize("peers", [False, pytest.param(True, marks=pytest.mark.skipif(
    not _peers_ready(), reason="no peers environment (python -m train.bench --loader-only makes it)"))])
def test_loader_bench_prints_every_loader(tmp_path: Path, peers: bool):
    args = ["--loader-only", "--no-dicom", "--peer-n", "40", "--rounds", "1", "--workdir", str(tmp_path)]
    done = subprocess.run([sys.executable, "-m", "train.bench", *args, *([] if peers else ["--no-peers"])],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    rows = {line.split("|")[1].strip(): line for line in done.stdout.splitlines() if line.startswith("| ")}
    peer_rows = ["streaming", "streaming, unshuffled", "litdata", "litdata, unshuffled"]
    expected = ["ours", "webdataset", "ours, 2 workers"] + (peer_rows if peers else [])
    assert set(expected) <= set(rows)
    assert all(rows[k].split("|")[3].strip().endswith("x") for k in expected if not k.startswith("ours"))


def test_the_table_takes_ratios_within_each_round():
    def run(rate: float) -> dict[str, float]:
        return {"samples": 100, "seconds": 100 / rate, "cpu_seconds": 0.01, "first_batch_s": 0.1}

    # Round 2 ran on a slower machine: the ratio stays 2x in both rounds.
    rounds = [{"ours": run(200), "webdataset": run(100)}, {"ours": run(100), "webdataset": run(50)},
              {"ours": run(300), "webdataset": run(150)}]
    text = table({"n": 100, "rounds": rounds})
    assert "| ours | 200 |" in text and "| webdataset | 100 | 2.00x | 100 | 0.100 |" in text
