"""train.checkpoint in one process: ``keep`` prunes the oldest checkpoints, ``latest`` names the
newest, a load restores model, optimizer, scheduler and training state, and a ``latest`` that
names an incomplete checkpoint is refused. A tiny linear model; DCP without a process group."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from train.checkpoint import CHECKPOINT_DIR, export_model, latest_checkpoint, load_checkpoint, load_export, save_checkpoint


def _parts(seed: int = 0) -> dict:
    torch.manual_seed(seed)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (1 + s))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    return {"model": model, "optimizer": optimizer, "scheduler": scheduler, "scaler": scaler}


def _step(parts: dict) -> None:
    parts["optimizer"].zero_grad()
    parts["model"](torch.ones(4, 3)).square().sum().backward()
    parts["optimizer"].step()
    parts["scheduler"].step()


def _save(run: Path, parts: dict, step: int, keep: int) -> Path:
    return save_checkpoint(run, step=step, train_state={"step": step, "seed": 3}, keep=keep, **parts)


# keep, steps saved, checkpoints left
KEEP_CASES = [
    (1, [1, 2, 3], [3]),
    (2, [1, 2, 3, 4], [3, 4]),
    (3, [5, 10], [5, 10]),
    (2, [2, 2], [2]),  # the same step saved again replaces it
]


@pytest.mark.parametrize(("keep", "steps", "left"), KEEP_CASES, ids=["keep1", "keep2", "fewer-than-keep", "resave"])
def test_keep_prunes_the_oldest_checkpoints(tmp_path: Path, keep: int, steps: list[int], left: list[int]):
    parts = _parts()
    for step in steps:
        _step(parts)
        _save(tmp_path, parts, step, keep)
    root = tmp_path / CHECKPOINT_DIR
    assert sorted(p.name for p in root.glob("step-*")) == [f"step-{s:08d}" for s in left]
    assert latest_checkpoint(tmp_path) == root / f"step-{left[-1]:08d}"


def test_load_restores_weights_optimizer_schedule_and_state(tmp_path: Path):
    saved = _parts(seed=0)
    _step(saved)
    _step(saved)
    _save(tmp_path, saved, 2, keep=2)
    fresh = _parts(seed=1)
    state = load_checkpoint(latest_checkpoint(tmp_path), **fresh)
    assert state == {"step": 2, "seed": 3}
    for a, b in zip(saved["model"].parameters(), fresh["model"].parameters()):
        assert torch.equal(a, b)
    assert fresh["scheduler"].get_last_lr() == saved["scheduler"].get_last_lr()
    _step(saved)
    _step(fresh)  # the restored Adam moments take the same step
    for a, b in zip(saved["model"].parameters(), fresh["model"].parameters()):
        assert torch.equal(a, b)


def test_no_checkpoint_is_none_and_an_incomplete_latest_is_refused(tmp_path: Path):
    assert latest_checkpoint(tmp_path) is None
    root = tmp_path / CHECKPOINT_DIR
    (root / "step-00000007").mkdir(parents=True)
    (root / "latest").write_text("step-00000007\n")
    with pytest.raises(FileNotFoundError, match="step-00000007, which has no DCP .metadata"):
        latest_checkpoint(tmp_path)


def test_export_round_trip_leaves_no_temporary_file(tmp_path: Path):
    model = _parts()["model"]
    export_model(tmp_path / "model.pt", model, {"task": "classify", "step": 5})
    data = load_export(tmp_path)
    assert data["task"] == "classify" and data["step"] == 5
    assert torch.equal(data["state_dict"]["weight"], model.weight)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    torch.save({"format": "something-else"}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="is not a pneumo-hpc-model/1 file"):
        load_export(tmp_path / "other.pt")
