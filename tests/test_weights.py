"""``--weights`` with an ultralytics release checkpoint: refused without ``--trust-weights``
(exit 2, the message names the flag), loaded with it; torchvision never imported.

The checkpoint is written by ultralytics' own code, as a release is: a training checkpoint
(the EMA model, 3 channels, 80 COCO classes) finalised by ``strip_optimizer`` (half
precision, optimizer dropped, ``date``/``version``/``license``/``train_args`` added).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from train.build import build_model

REPO = Path(__file__).resolve().parents[1]
STEM = "model.0.conv.weight"
CLASS_HEAD = "model.22.cv3.0.2.weight"  # 80 output channels in a COCO checkpoint

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


@pytest.fixture(scope="module")
def release_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from train.models import _ultralytics

    _ultralytics()  # offline, writable settings folder: before ultralytics is imported
    from ultralytics.cfg import get_cfg
    from ultralytics.nn.tasks import DetectionModel
    from ultralytics.utils.torch_utils import strip_optimizer

    torch.manual_seed(7)
    net = DetectionModel("yolov8n.yaml", ch=3, nc=80, verbose=False)
    net.args = get_cfg()
    path = tmp_path_factory.mktemp("ultralytics") / "yolov8n.pt"
    # what BaseTrainer.save_model writes (ultralytics/engine/trainer.py), minus the results
    torch.save({"epoch": 0, "best_fitness": None, "model": None,
                "ema": copy.deepcopy(net).half(), "updates": 1, "optimizer": None,
                "scaler": None, "train_args": vars(net.args), "train_metrics": {},
                "train_results": {}}, path)
    strip_optimizer(path)
    return path


def test_release_checkpoint_is_in_ultralytics_format(release_checkpoint: Path) -> None:
    ckpt = torch.load(release_checkpoint, map_location="cpu", weights_only=False)
    assert {"model", "train_args", "date", "version", "license", "epoch"} <= set(ckpt)
    assert type(ckpt["model"]).__name__ == "DetectionModel" and ckpt["epoch"] == -1
    assert ckpt["ema"] is None and ckpt["optimizer"] is None
    assert ckpt["model"].state_dict()[STEM].dtype == torch.float16


def test_release_checkpoint_needs_trust_then_loads(release_checkpoint: Path) -> None:
    with pytest.raises(ValueError, match="--trust-weights"):
        build_model("detect", "yolov8n", weights=release_checkpoint)
    model, _ = build_model("detect", "yolov8n", weights=release_checkpoint, trust_weights=True)
    theirs = torch.load(release_checkpoint, map_location="cpu", weights_only=False)["model"]
    theirs = theirs.float().state_dict()
    ours = model.state_dict()
    # the 3-channel stem is summed to the one grey channel; the 80-class conv is not loaded
    assert torch.equal(ours[STEM], theirs[STEM].sum(dim=1, keepdim=True))
    assert ours[CLASS_HEAD].shape[0] == 1 and theirs[CLASS_HEAD].shape[0] == 80
    same = [k for k in ours if k in theirs and ours[k].shape == theirs[k].shape and k != STEM]
    assert len(same) > 0.85 * len(ours)  # all but the class branch, whose width follows nc
    assert all(torch.equal(ours[k], theirs[k]) for k in same)


@pytest.mark.slow
def test_cli_weights_from_ultralytics(release_checkpoint: Path, ingested_small: Path,
                                      tmp_path: Path) -> None:
    (tmp_path / "sitecustomize.py").write_text(NO_TORCHVISION)
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "train", "--data", str(ingested_small), "--task", "detect",
            "--weights", str(release_checkpoint), "--image-size", "64", "--batch-size", "4",
            "--workers", "0", "--amp", "none", "--max-steps", "1"]

    def train(out: str, *extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([*args, "--out", str(tmp_path / out), *extra], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=240, check=False)

    refused = train("refused")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "--trust-weights" in refused.stderr and "Traceback" not in refused.stderr
    trusted = train("trusted", "--trust-weights")
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert "full unpickle" in trusted.stderr and (tmp_path / "trusted" / "model.pt").is_file()
