"""``--weights`` with an ultralytics release checkpoint (``ultralytics_release`` in
conftest.py, written by ultralytics' own ``strip_optimizer``): refused without
``--trust-weights`` (exit 2, the message names the flag), loaded with it; torchvision never
imported.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import train_cli
from train.build import build_model
from train.models import build_detector, load_detector_weights

STEM = "model.0.conv.weight"
CLASS_HEAD = "model.22.cv3.0.2.weight"  # 80 output channels in a COCO checkpoint


def test_release_checkpoint_loads_all_but_the_class_branch_in_float32(ultralytics_release: Path) -> None:
    model = build_detector("yolov8n")
    missing, skipped = load_detector_weights(model, ultralytics_release, trust_pickle=True)
    # the class branch's width follows nc (80 in the release, 1 here): every one of its
    # tensors is skipped and left as initialised, and nothing else
    class_branch = sorted(k for k in model.state_dict()
                          if k.startswith("model.22.cv3.") and not k.endswith("num_batches_tracked"))
    assert class_branch and sorted(missing) == sorted(skipped) == class_branch
    release = torch.load(ultralytics_release, map_location="cpu", weights_only=False)["model"]
    assert release.state_dict()[STEM].dtype == torch.float16
    assert all(v.dtype == torch.float32 for v in model.state_dict().values() if v.is_floating_point())


def test_release_checkpoint_needs_trust_then_loads(ultralytics_release: Path) -> None:
    with pytest.raises(ValueError, match="--trust-weights"):
        build_model("detect", "yolov8n", weights=ultralytics_release)
    model, _ = build_model("detect", "yolov8n", weights=ultralytics_release, trust_weights=True)
    theirs = torch.load(ultralytics_release, map_location="cpu", weights_only=False)["model"]
    theirs = theirs.float().state_dict()
    ours = model.state_dict()
    # the 3-channel stem is summed to the one grey channel; the 80-class conv is not loaded
    assert torch.equal(ours[STEM], theirs[STEM].sum(dim=1, keepdim=True))
    assert ours[CLASS_HEAD].shape[0] == 1 and theirs[CLASS_HEAD].shape[0] == 80
    same = [k for k in ours if k in theirs and ours[k].shape == theirs[k].shape and k != STEM]
    assert len(same) > 0.85 * len(ours)  # all but the class branch, whose width follows nc
    assert all(torch.equal(ours[k], theirs[k]) for k in same)


@pytest.mark.slow
def test_cli_weights_from_ultralytics(ultralytics_release: Path, ingested_small: Path, tmp_path: Path,
                                      detector_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    refused = train_cli("--data", str(ingested_small), "--out", str(tmp_path / "refused"),
                        "--task", "detect", "--weights", str(ultralytics_release), "--workers", "0")
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "--trust-weights" in refused.stderr and "Traceback" not in refused.stderr
    run, trusted = detector_run  # the same, with --trust-weights and torchvision blocked
    assert trusted.returncode == 0, trusted.stderr[-3000:]
    assert "full unpickle" in trusted.stderr and (run / "model.pt").is_file()
