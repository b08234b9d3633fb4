"""Training end to end on CPU with gloo: two-rank torchrun runs of both tasks under DDP and
FSDP2 with bf16 autocast, mid-epoch resume (same and fewer ranks), exactly-once
evaluation, predict and report; plus a (slow) learning test on bright synthetic opacities.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools.serve import free_port
from tests.procs import run_or_dump_stacks
from train.checkpoint import load_export
from train.config import TrainConfig, load_toml

REPO = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 240
VAL_SAMPLES = 6  # ingested_small: 24 images, val_fraction 0.25
TRAIN_STEPS = 5  # 18 train samples (shards 4, 4, 4, 4, 2) / global batch 4


def launch(args: list[str], *, nproc: int = 2, module: str = "train",
           timeout: int = RUN_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``python -m <module>`` (through torchrun on loopback when ``nproc`` > 1)."""
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", module]
    else:
        cmd = [sys.executable, "-m", module]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return run_or_dump_stacks(cmd + args, timeout=timeout, cwd=REPO, env=env)


def ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}"


def records(run: Path, kind: str) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def small_args(data: Path, run: Path, task: str, strategy: str, *extra: str) -> list[str]:
    return ["--data", str(data), "--out", str(run), "--task", task, "--strategy", strategy,
            "--amp", "bf16", "--image-size", "64", "--batch-size", "4", "--eval-batch-size", "4",
            "--workers", "1", "--log-every", "1", "--seed", "3", *extra]


_RUNS: dict[tuple[str, str], Path] = {}


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


def two_rank_run(data: Path, runs_dir: Path, task: str, strategy: str) -> Path:
    """One epoch on two ranks, made once per module and shared by the tests below."""
    key = (task, strategy)
    if key not in _RUNS:
        run = runs_dir / f"{task}-{strategy}"
        ok(launch(small_args(data, run, task, strategy, "--epochs", "1")))
        _RUNS[key] = run
    return _RUNS[key]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("task", ["classify", "detect"])
def test_two_rank_run(ingested_small: Path, runs_dir: Path, task: str, strategy: str):
    run = two_rank_run(ingested_small, runs_dir, task, strategy)
    train = records(run, "train")
    assert [r["step"] for r in train] == list(range(1, TRAIN_STEPS + 1))
    terms = ["loss"] if task == "classify" else ["loss", "box", "cls", "dfl"]
    for r in train:
        assert set(terms + ["lr", "images_per_s", "data_wait", "peak_mem_mb"]) <= set(r)
        assert 0 <= r["data_wait"] <= 1 and r["images_per_s"] > 0
    evaluation = json.loads((run / "eval.json").read_text())
    # uneven shards, yet both ranks took the same number of batches; val seen exactly once
    assert evaluation["train_batches_per_rank"] == [TRAIN_STEPS, TRAIN_STEPS]
    assert evaluation["samples"] == VAL_SAMPLES
    assert len(set(evaluation["batches_per_rank"])) == 1
    if task == "classify":
        assert {"accuracy", "roc_auc", "sensitivity", "specificity", "f1", "baseline_accuracy"} <= set(evaluation)
    else:
        assert {"map50", "rsna", "rsna_best"} <= set(evaluation)
    cfg = TrainConfig.from_dict(load_toml(run / "config.toml"))
    assert (cfg.model.task, cfg.parallel.strategy, cfg.parallel.amp) == (task, strategy, "bf16")
    export = load_export(run)
    assert export["task"] == task and export["step"] == TRAIN_STEPS
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step-{TRAIN_STEPS:08d}"


def _losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(run, "train")}


RESUME_ARGS = ("--epochs", "2", "--ckpt-every", "3")


@pytest.fixture(scope="module")
def interrupted(ingested_small: Path, runs_dir: Path) -> Path:
    """A two-rank FSDP run of 2 epochs (10 steps) stopped at step 7, mid-epoch; tests copy it."""
    run = runs_dir / "interrupted"
    ok(launch(small_args(ingested_small, run, "classify", "fsdp", *RESUME_ARGS, "--max-steps", "7")))
    return run


def test_resume_mid_epoch_repeats_the_uninterrupted_run(ingested_small: Path, interrupted: Path,
                                                        tmp_path: Path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    ok(launch(small_args(ingested_small, whole, "classify", "fsdp", *RESUME_ARGS)))
    shutil.copytree(interrupted, cut)
    assert max(_losses(cut)) == 7
    partial = records(cut, "eval")[-1]
    assert partial["partial_epoch"] and partial["step"] == 7 and partial["samples"] == VAL_SAMPLES

    ok(launch(["--out", str(cut), "--resume"]))  # the rest from RUN/config.toml
    expected, got = _losses(whole), _losses(cut)
    assert sorted(got) == list(range(1, 11))
    for step in (8, 9, 10):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step
    final_whole = json.loads((whole / "eval.json").read_text())
    final_cut = json.loads((cut / "eval.json").read_text())
    assert final_cut["train_batches_per_rank"] == [3, 3]  # steps 8-10 of epoch 2
    assert final_cut["roc_auc"] == pytest.approx(final_whole["roc_auc"], nan_ok=True)


def test_resume_from_two_ranks_on_one(interrupted: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(interrupted, run)
    ok(launch(["--out", str(run), "--resume", "--strategy", "ddp"], nproc=1))
    steps = [r["step"] for r in records(run, "train")]
    assert steps == list(range(1, 11))  # 1-7 on two ranks (FSDP), then 8-10 on one
    last = records(run, "eval")[-1]
    assert last["step"] == 10 and last["train_batches_per_rank"] == [3]
    assert last["samples"] == VAL_SAMPLES
    assert load_export(run)["step"] == 10


def test_predict_writes_rsna_submission_rows(ingested_small: Path, runs_dir: Path, tmp_path: Path):
    run = two_rank_run(ingested_small, runs_dir, "detect", "ddp")
    out = tmp_path / "submission.csv"
    ok(launch(["--data", str(ingested_small), "--checkpoint", str(run), "--out", str(out),
               "--conf", "0.0", "--workers", "0"], nproc=1, module="train.predict"))
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 24 and set(rows[0]) == {"patientId", "PredictionString"}
    groups = [row["PredictionString"].split() for row in rows]
    assert all(len(g) % 5 == 0 for g in groups) and any(groups)
    for g in groups:
        for i in range(0, len(g), 5):
            conf, x, y, w, h = map(float, g[i : i + 5])
            # source DICOMs are 128 px (stored at 64): boxes come back in source pixels
            assert 0 <= conf <= 1 and 0 <= x and 0 <= y and w > 0 and h > 0
            assert x + w <= 128.01 and y + h <= 128.01

    classified = tmp_path / "probabilities.csv"
    ok(launch(["--data", str(ingested_small), "--checkpoint",
               str(two_rank_run(ingested_small, runs_dir, "classify", "ddp")),
               "--out", str(classified), "--split", "val", "--workers", "0"],
              nproc=1, module="train.predict"))
    rows = list(csv.DictReader(classified.open()))
    assert len(rows) == VAL_SAMPLES and all(0 <= float(r["probability"]) <= 1 for r in rows)


def test_report_draws_the_curves(ingested_small: Path, runs_dir: Path, tmp_path: Path):
    from matplotlib.image import imread

    from train.report import LOSS, LR, VALIDATION, load_metrics, main, panels

    run = two_rank_run(ingested_small, runs_dir, "classify", "ddp")
    drawn = panels(*load_metrics(run))
    assert list(drawn[LOSS]) == ["loss"] and drawn[LOSS]["loss"][0] == list(range(1, TRAIN_STEPS + 1))
    assert drawn[LR]["lr"][1] == [r["lr"] for r in records(run, "train")]
    assert {"accuracy", "roc_auc", "f1", "all-negative accuracy"} <= set(drawn[VALIDATION])
    assert drawn[VALIDATION]["accuracy"][0] == [TRAIN_STEPS]
    png = tmp_path / "curves.png"
    assert main([str(run), "-o", str(png)]) == 0
    assert imread(png).shape[:2] == (800, 1200)  # a readable PNG of the 12 x 8 in figure


def test_report_keeps_a_resumed_runs_latest_records_and_picks_the_detector_metrics(tmp_path: Path):
    from train.report import LOSS, VALIDATION, load_metrics, panels

    lines = [
        {"kind": "train", "step": 1, "loss": 3.0, "box": 1.0, "cls": 1.0, "dfl": 1.0},
        {"kind": "train", "step": 2, "loss": 2.0, "box": 1.0, "cls": 0.5, "dfl": 0.5},
        {"kind": "train", "step": 2, "loss": 1.5, "box": 0.5, "cls": 0.5, "dfl": 0.5},  # resumed
        {"kind": "eval", "step": 2, "map50": 0.1, "rsna": None, "rsna_best": 0.2, "image_auc": 0.6},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    drawn = panels(*load_metrics(tmp_path))
    assert drawn[LOSS]["loss"] == ([1, 2], [3.0, 1.5])
    assert set(drawn[LOSS]) == {"loss", "box", "cls", "dfl"}
    assert drawn[VALIDATION] == {"map50": ([2], [0.1]), "rsna_best": ([2], [0.2]), "image_auc": ([2], [0.6])}


def test_non_finite_loss_names_the_step_and_terms():
    from train.state import LossGuard, NonFiniteLossError

    guard = LossGuard(("loss", "box", "cls", "dfl"))
    guard.update(1, torch.tensor([1.0, 0.5, 0.3, 0.2]))
    guard.check()
    guard.update(2, torch.tensor([float("nan"), float("nan"), 0.3, 0.2]))
    guard.update(3, torch.tensor([float("inf"), 1.0, 0.3, 0.2]))
    with pytest.raises(NonFiniteLossError, match=r"step 2: loss=nan, box=nan, cls=0.3, dfl=0.2"):
        guard.check()


def test_cli_settings_precedence(tmp_path: Path):
    from train.__main__ import build_parser, resolve_config

    (tmp_path / "cfg.toml").write_text('epochs = 4\n[data]\nbatch_size = 8\nworkers = 0\n'
                                       '[model]\ntask = "detect"\n')
    args = build_parser().parse_args(["--data", "ds", "--out", str(tmp_path / "run"), "--config",
                                      str(tmp_path / "cfg.toml"), "--batch-size", "16"])
    cfg = resolve_config(args)
    assert (cfg.epochs, cfg.data.batch_size, cfg.data.workers) == (4, 16, 0)
    assert (cfg.model.task, cfg.model.name) == ("detect", "yolov8n")
    with pytest.raises(ValueError, match="data.path is not set"):
        resolve_config(build_parser().parse_args(["--out", "x"]))
    with pytest.raises(ValueError, match="unknown config key"):
        (tmp_path / "bad.toml").write_text("epoch = 3\n")
        resolve_config(build_parser().parse_args(["--data", "d", "--out", "o", "--config", str(tmp_path / "bad.toml")]))


def test_bad_world_size_is_a_usage_error(ingested_small: Path, tmp_path: Path):
    proc = launch(["--data", str(ingested_small), "--out", str(tmp_path / "r"), "--batch-size", "3",
                   "--workers", "0"], nproc=2)
    assert proc.returncode != 0
    assert "world size 2 must divide data.batch_size=3" in proc.stderr


@pytest.mark.slow
def test_models_learn_bright_opacities(tmp_path: Path):
    """160 synthetic 256 px images (half positive) ingested at 128 px: within a CPU budget
    of about a minute the classifier's AUC and the detector's mAP@0.5 rise well above chance."""
    from ingest.synth import make_ingested

    data = make_ingested(tmp_path, 160, seed=0, src_size=256, positive_fraction=0.5,
                         size=128, shard_size=16, workers=2, val_fraction=0.25).out
    common = ["--data", str(data), "--batch-size", "16", "--workers", "1", "--amp", "none",
              "--lr", "2e-3", "--log-every", "4", "--epochs", "4"]
    cls_run, det_run = tmp_path / "classify", tmp_path / "detect"
    ok(launch([*common, "--task", "classify", "--out", str(cls_run), "--image-size", "64"], nproc=1))
    ok(launch([*common, "--task", "detect", "--out", str(det_run)], nproc=1))
    cls = json.loads((cls_run / "eval.json").read_text())
    det = json.loads((det_run / "eval.json").read_text())
    assert cls["roc_auc"] >= 0.85, cls
    assert cls["accuracy"] > cls["baseline_accuracy"] + 0.15, cls
    assert det["map50"] >= 0.5, det
