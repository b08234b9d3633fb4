"""docs/dataset-format.md's worked example of a dataset's year (the first ingest, a month's new
studies appended, a training run pinned to a version, a withdrawal, gc) runs as written, on
small synthetic data, the way tests/test_docs.py runs the getting-started page."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tests.inputs import copy_into

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "dataset-format.md"
SECTION = "### A worked example: a year of a dataset"

# What the test changes in the blocks so that they run in seconds on 2 cores, with the number
# of times each must match: a change of the page that breaks one fails here.
SUBSTITUTIONS: dict[str, tuple[str, int]] = {
    "--size 640 --shard-size 256": ("--size 64 --shard-size 4 --workers 1 --no-progress", 2),
    "--model yolov8s": ("--model yolov8s --epochs 1 --batch-size 4 --image-size 64 --workers 0 --amp none", 1),
    "--deep": ("--deep --workers 1 --no-progress", 1),
}


def lifecycle_blocks() -> list[str]:
    """The bash blocks of the worked example, in page order."""
    text = PAGE.read_text()
    start = text.index(SECTION) + len(SECTION)
    end = text.find("\n## ", start)
    return re.findall(r"```bash\n(.*?)```", text[start:] if end < 0 else text[start:end], re.S)


def test_the_substitutions_each_apply_as_often_as_stated() -> None:
    text = "".join(lifecycle_blocks())
    for old, (_, times) in SUBSTITUTIONS.items():
        assert text.count(old) == times, f"dataset-format.md's example: {old!r} appears {text.count(old)} times"
    assert text.count("PATIENT_ID") == 1


@pytest.fixture
def exports(synth_small, tmp_path: Path) -> tuple[Path, str]:
    """January's and February's exports (16 and 8 of ``synth_small``'s files), the labels of
    all of them, and the patient who withdraws (one of January's)."""
    files = sorted(synth_small.images_dir.glob("*.dcm"))
    copy_into(tmp_path / "export" / "2027-01", files[:16])
    copy_into(tmp_path / "export" / "2027-02", files[16:])
    shutil.copyfile(synth_small.labels_csv, tmp_path / "labels.csv")
    shutil.copyfile(synth_small.class_info_csv, tmp_path / "classes.csv")
    return tmp_path, files[0].stem


@pytest.mark.slow
def test_the_worked_example_runs_as_written(exports: tuple[Path, str]) -> None:
    cwd, patient = exports
    bindir = cwd / ".bin"
    bindir.mkdir()
    # A script, not a link: a venv's interpreter finds its pyvenv.cfg through the path it is run by.
    (bindir / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    (bindir / "python").chmod(0o755)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PNEUMO_DASHBOARD": ":0",
           "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    outputs = []
    for n, code in enumerate(lifecycle_blocks()):
        for old, (new, _) in SUBSTITUTIONS.items():
            code = code.replace(old, new)
        code = code.replace("PATIENT_ID", patient)
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=cwd, env=env, capture_output=True,
                              text=True, timeout=300, check=False)
        assert proc.returncode == 0, f"block {n} failed:\n{code}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        outputs.append(proc.stdout)
    first, month, _, withdrawal, gc = outputs
    assert "first ingest from" in first and "export/2027-01" in first
    assert "OK" in month
    assert re.search(r"v2 .* unavailable since", withdrawal) and re.search(r"v3 .* withdraw: withdrew 1 patients", withdrawal)
    assert "version = 2" in (cwd / "runs/feb/config.toml").read_text() and (cwd / "runs/feb/model.pt").is_file()
    assert "would delete" in gc
    assert patient.encode() not in (cwd / "data/cxr/manifest.json").read_bytes()
