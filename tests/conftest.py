"""Shared fixtures: small synthetic data sets made once per session, in temporary folders."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

# ultralytics reads these at import: no network, no downloads, a writable settings folder.
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "false")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-cfg-"))
os.environ.setdefault("PNEUMO_DASHBOARD", ":0")  # tests never fight over port 8787

pytest_plugins = ["tests.slurm_fixture"]


@pytest.fixture(scope="session")
def synth_small(tmp_path_factory: pytest.TempPathFactory):
    """24 RSNA-like 128x128 DICOMs with labels (about 5 positives)."""
    from ingest.synth import make_dataset

    return make_dataset(tmp_path_factory.mktemp("synth") / "rsna", 24, seed=0, size=128, progress=False)


@pytest.fixture(scope="session")
def ingested_small(synth_small, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``synth_small`` ingested at 64 px into 4-sample shards (2 local workers)."""
    from ingest.pipeline import run_ingest

    out = tmp_path_factory.mktemp("ingested") / "ds"
    run_ingest(synth_small.ingest_config(out, size=64, shard_size=4, workers=2, val_fraction=0.25))
    return out


@pytest.fixture(scope="session")
def ingested_small_v1(ingested_small: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``ingested_small`` as format 1 wrote it (no per-sample checksums in the manifest)."""
    from tests.formats import as_format_1

    out = tmp_path_factory.mktemp("ingested-v1") / "ds"
    shutil.copytree(ingested_small, out)
    as_format_1(out)
    return out


# Put on PYTHONPATH ahead of the repository, it makes any import of torchvision fail.
NO_TORCHVISION = '''
import sys

class _NoTorchvision:
    def find_spec(self, name, path=None, target=None):
        if name == "torchvision" or name.startswith("torchvision."):
            raise ImportError("this project never imports torchvision")
        return None

sys.meta_path.insert(0, _NoTorchvision())
'''


@pytest.fixture(scope="session")
def ultralytics_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A yolov8n checkpoint (3 channels, 80 classes) in ultralytics' release format, written
    by ultralytics' own code: what ``BaseTrainer.save_model`` saves, finalised by
    ``strip_optimizer`` (half precision, optimizer dropped, date/version/license added)."""
    import copy

    import torch

    from train.models.yolo import load_ultralytics

    load_ultralytics()  # offline, writable settings folder: before ultralytics is imported
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import strip_optimizer

    torch.manual_seed(7)
    net = DetectionModel("yolov8n.yaml", ch=3, nc=80, verbose=False)
    net.args = get_cfg()
    path = tmp_path_factory.mktemp("ultralytics") / "yolov8n.pt"
    torch.save({"epoch": 0, "best_fitness": None, "model": None,
                "ema": copy.deepcopy(net).half(), "updates": 1, "optimizer": None,
                "scaler": None, "train_args": vars(net.args), "train_metrics": {},
                "train_results": {}}, path)
    strip_optimizer(path)
    return path


def train_cli(*args: str, pythonpath: tuple[Path, ...] = ()) -> subprocess.CompletedProcess:
    """``python -m train ARGS`` in a fresh process from the repository root."""
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, [*pythonpath, repo])),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "train", *args], cwd=repo, env=env,
                          capture_output=True, text=True, timeout=240, check=False)


@pytest.fixture(scope="session")
def detector_run(ultralytics_release: Path, ingested_small: Path,
                 tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One detector step on ``ingested_small`` at 64 px, started from ``ultralytics_release``
    with ``--trust-weights`` and torchvision imports blocked: (run folder, the process)."""
    tmp = tmp_path_factory.mktemp("detector-run")
    (tmp / "sitecustomize.py").write_text(NO_TORCHVISION)
    proc = train_cli("--data", str(ingested_small), "--out", str(tmp / "run"), "--task", "detect",
                     "--weights", str(ultralytics_release), "--trust-weights", "--image-size", "64",
                     "--batch-size", "4", "--workers", "0", "--amp", "none", "--max-steps", "1",
                     pythonpath=(tmp,))
    return tmp / "run", proc
