"""The examples users copy run as written: the "Use the shards from your code" snippets of
``docs/dataset-format.md`` and ``notebooks/explore.ipynb`` (executed with nbclient on ``ingested_small`` and
the one-step detector of the ``detector_run`` fixture).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGE = REPO / "docs" / "dataset-format.md"
SECTION = "## Use the shards from your code"
TRAIN_SAMPLES = 18  # ingested_small: 24 images, val_fraction 0.25


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def page_snippets() -> list[str]:
    text = PAGE.read_text()
    start = text.index(SECTION)
    end = text.find("\n## ", start + len(SECTION))
    return re.findall(r"```python\n(.*?)```", text[start:end if end > 0 else None], re.S)


def test_page_has_both_snippets() -> None:
    webdataset, loader = page_snippets()
    assert "wds.WebDataset(urls" in webdataset and '.to_tuple("npy", "json")' in webdataset
    assert "ShardLoader(" in loader and "rank" in loader and "loader.epoch(0)" in loader
    assert len(loader.strip().splitlines()) <= 12


@pytest.fixture
def cwd_with_dataset(ingested_small: Path, tmp_path: Path) -> Path:
    """A folder where ``dataset`` is the test dataset, as the snippets name it."""
    (tmp_path / "dataset").symlink_to(ingested_small)
    return tmp_path


@pytest.mark.parametrize("which", ["webdataset", "loader"])
def test_page_snippet_runs(which: str, cwd_with_dataset: Path) -> None:
    code = dict(zip(["webdataset", "loader"], page_snippets()))[which]
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd_with_dataset, env=_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    if which == "webdataset":
        assert len(lines) == TRAIN_SAMPLES
        assert all("(64, 64) uint8" in line for line in lines)
    else:
        assert lines[0] == "3 steps of 8 samples on this rank"  # ceil(18 / 8)
        assert [line.split()[0] for line in lines[1:]] == ["0", "1", "2"]
        assert "torch.Size([8, 1, 256, 256])" in lines[1]


@pytest.mark.slow
def test_explore_notebook_runs(ingested_small: Path, monkeypatch: pytest.MonkeyPatch,
                               detector_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    import nbformat
    from nbclient import NotebookClient

    run, train = detector_run  # one step of the detector on ingested_small
    assert train.returncode == 0, train.stderr[-3000:]

    nb = nbformat.read(REPO / "notebooks" / "explore.ipynb", as_version=4)
    # the notebook's parameters; the kernel inherits this process's environment
    for key, value in {"DATASET": str(ingested_small), "MODEL": str(run / "model.pt"),
                       "SAMPLES": "4", "PYTHONPATH": str(REPO)}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("MPLBACKEND", raising=False)  # Agg would draw nothing into the notebook
    NotebookClient(nb, timeout=180, kernel_name="python3",
                   resources={"metadata": {"path": str(REPO / "notebooks")}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 3  # stats, samples, predictions beside the truth
    text = "".join(o.get("text", "") for o in outputs)
    assert "dataset:" in text and "detect model yolov8n, step 1, 64 px" in text
