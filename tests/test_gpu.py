"""The CUDA code paths, on one GPU: bf16 autocast, fp16 with a GradScaler, a 1-rank NCCL
group, SyncBatchNorm, pinned host batches copied with ``non_blocking``, FSDP2 on CUDA, one
detector step at 640 px, and a short end-to-end run.

Every test is marked ``gpu`` and skips itself without CUDA; ``make gpu-check`` runs them
(and ``python -m train.bench --size 640``) in a few minutes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

from tools.serve import free_port
from train.checkpoint import export_model, load_export
from train.data import ShardLoader, read_split, to_device
from train.distributed import (
    DistEnv,
    autocast_context,
    make_grad_scaler,
    parallelize,
)
from train.models import (
    ClassifierConfig,
    DetectionLoss,
    PneumoniaCNN,
    build_detector,
    detector_blocks,
    postprocess_detections,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    device = torch.device("cuda", 0)
    torch.cuda.set_device(device)
    return device


@pytest.fixture(scope="module")
def nccl(cuda: torch.device) -> Iterator[DistEnv]:
    """A 1-rank NCCL process group on loopback (one GPU cannot hold two NCCL ranks)."""
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0,
                            world_size=1, device_id=cuda)
    try:
        yield DistEnv(rank=0, world_size=1, local_rank=0, device=cuda, backend="nccl")
    finally:
        dist.destroy_process_group()


def small_cnn() -> PneumoniaCNN:
    torch.manual_seed(0)
    return PneumoniaCNN(ClassifierConfig(width=8, depth=3, dropout=0.0))


def cnn_step(model: nn.Module, device: torch.device, amp: str,
             scaler: torch.amp.GradScaler | None = None) -> torch.Tensor:
    """One AdamW step of a classifier on a random batch; returns the loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = scaler or make_grad_scaler(amp, device)
    x = torch.rand(4, 1, 64, 64, device=device)
    y = torch.tensor([0.0, 1.0, 0.0, 1.0], device=device)
    with autocast_context(amp, device):
        out = model(x)
    loss = nn.functional.binary_cross_entropy_with_logits(out.float(), y)
    opt.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    return loss.detach()


def test_bf16_autocast_runs_convolutions_in_bf16(cuda: torch.device) -> None:
    model = small_cnn().to(cuda)
    seen: list[torch.dtype] = []
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    first_conv.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    loss = cnn_step(model, cuda, "bf16")
    assert seen == [torch.bfloat16] and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32
               for p in model.parameters())


def test_fp16_grad_scaler_scales_and_skips_overflow(cuda: torch.device) -> None:
    model = small_cnn().to(cuda)
    scaler = make_grad_scaler("fp16", cuda)
    assert scaler.is_enabled() and not make_grad_scaler("bf16", cuda).is_enabled()
    assert torch.isfinite(cnn_step(model, cuda, "fp16", scaler))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scale = scaler.get_scale()
    # an overflowing gradient: the step is skipped and the scale backs off
    handle = model.head.register_full_backward_hook(
        lambda m, gi, go: tuple(torch.full_like(g, float("inf")) if g is not None else g for g in gi))
    cnn_step(model, cuda, "fp16", scaler)
    handle.remove()
    assert scaler.get_scale() < scale
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()
               if "running" not in k and "num_batches" not in k)


def test_nccl_group_of_one_rank(nccl: DistEnv) -> None:
    x = torch.arange(4.0, device=nccl.device)
    dist.all_reduce(x)
    assert x.tolist() == [0.0, 1.0, 2.0, 3.0]
    out: list[object] = [None]
    dist.all_gather_object(out, {"rank": 0})
    assert out == [{"rank": 0}]
    dist.barrier()


def test_sync_batchnorm_under_ddp(nccl: DistEnv) -> None:
    model = parallelize(small_cnn(), nccl, strategy="ddp", amp="bf16")
    assert isinstance(model, nn.parallel.DistributedDataParallel)
    kinds = {type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    assert kinds == {nn.SyncBatchNorm}
    assert torch.isfinite(cnn_step(model, nccl.device, "bf16"))


def test_pinned_batches_copy_non_blocking(ingested_small: Path, cuda: torch.device) -> None:
    info = read_split(ingested_small, "train")
    loader = ShardLoader(info, rank=0, world=1, global_batch=4, lanes=2, workers=1, pin_memory=True)
    for batch in loader.epoch(0):
        assert batch.images.is_pinned() and batch.target.is_pinned()
        dev = to_device(batch, cuda, size=128)
        torch.cuda.current_stream().synchronize()
        ref = to_device(batch, torch.device("cpu"), size=128)
        assert dev.images.device == cuda
        assert torch.allclose(dev.images.cpu(), ref.images, atol=1e-5)
        assert torch.equal(dev.boxes.cpu(), ref.boxes) and torch.equal(dev.target.cpu(), ref.target)


@pytest.mark.parametrize(("amp", "low_precision_params"), [("bf16", False), ("bf16", True), ("fp16", False)])
def test_fsdp2_on_cuda(nccl: DistEnv, amp: str, low_precision_params: bool, tmp_path: Path) -> None:
    from torch.distributed.tensor import DTensor

    torch.manual_seed(0)
    net = build_detector("yolov8n")
    model = parallelize(net, nccl, strategy="fsdp", blocks=detector_blocks(net), amp=amp,
                        low_precision_params=low_precision_params)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    criterion = DetectionLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = make_grad_scaler(amp, nccl.device, sharded=True)
    x = torch.rand(2, 1, 128, 128, device=nccl.device)
    boxes = [torch.tensor([[20.0, 30.0, 70.0, 90.0]], device=nccl.device), torch.zeros(0, 4, device=nccl.device)]
    for _ in range(2):
        with autocast_context(amp, nccl.device):
            out = model(x)
        loss, _ = criterion(out, boxes, image_size=128)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        assert torch.isfinite(loss)
    path = export_model(tmp_path / "model.pt", model, {"task": "detect"})  # gathers the shards
    assert path is not None
    state = load_export(path)["state_dict"]
    assert state["model.0.conv.weight"].shape == (16, 1, 3, 3) and state["model.0.conv.weight"].device.type == "cpu"


def test_one_detector_step_at_640(cuda: torch.device) -> None:
    torch.manual_seed(0)
    model = build_detector("yolov8n").to(cuda)
    criterion = DetectionLoss(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.rand(4, 1, 640, 640, device=cuda)
    boxes = [torch.tensor([[100.0, 120.0, 300.0, 420.0]], device=cuda)] * 2 + [torch.zeros(0, 4, device=cuda)] * 2
    torch.cuda.reset_peak_memory_stats(cuda)
    with autocast_context("bf16", cuda):
        out = model(x)
    loss, terms = criterion(out, boxes, image_size=640)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and all(torch.isfinite(t) for t in terms.values())
    assert torch.cuda.max_memory_allocated(cuda) > 0
    model.eval()
    with torch.no_grad(), autocast_context("bf16", cuda):
        dets = postprocess_detections(model(x), conf=0.0, max_det=10)
    assert len(dets) == 4 and all(d.shape[1] == 5 for d in dets)


@pytest.mark.parametrize("task", ["classify", "detect"])
def test_train_end_to_end_on_one_gpu(ingested_small: Path, tmp_path: Path, task: str) -> None:
    """``python -m train`` on the GPU: pinned loader, fp16 (classify) or bf16 (detect),
    evaluation, checkpoint and export."""
    amp = "fp16" if task == "classify" else "bf16"
    proc = subprocess.run(
        [sys.executable, "-m", "train", "--data", str(ingested_small), "--out", str(tmp_path / "run"),
         "--task", task, "--amp", amp, "--batch-size", "4", "--workers", "1", "--epochs", "1",
         "--log-every", "1"],
        cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True,
        timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "on cuda:0" in proc.stderr and (tmp_path / "run" / "model.pt").is_file()
