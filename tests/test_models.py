"""The classifier's shapes, the YOLOv8 detector's build, loss, postprocessing and weights."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from train.models import (
    ClassifierConfig,
    DetectionLoss,
    PneumoniaCNN,
    build_detector,
    detector_blocks,
    load_detector_weights,
    postprocess_detections,
)

# ---------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "shape"),
    [
        (ClassifierConfig(), (2, 1, 128, 128)),
        (ClassifierConfig(width=8, depth=2, blocks_per_stage=0), (3, 1, 64, 48)),
        (ClassifierConfig(width=8, depth=5, blocks_per_stage=2, dropout=0.0), (1, 1, 96, 96)),
        (ClassifierConfig(in_channels=3, width=4, depth=1), (2, 3, 32, 32)),
    ],
)
def test_classifier_forward_shape(config: ClassifierConfig, shape: tuple[int, ...]) -> None:
    model = PneumoniaCNN(config)
    assert len(model.blocks) == config.depth
    out = model(torch.randn(shape))
    assert out.shape == (shape[0],) and out.dtype == torch.float32
    out.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(shape)).shape == (shape[0],)


def test_classifier_prior_sets_initial_logit() -> None:
    model = PneumoniaCNN(ClassifierConfig(width=4, depth=2, prior=0.2)).eval()
    with torch.no_grad():
        p = torch.sigmoid(model(torch.zeros(1, 1, 32, 32)))
    assert p.item() == pytest.approx(0.2, abs=0.02)


def test_classifier_rejects_wrong_channels() -> None:
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        PneumoniaCNN(ClassifierConfig(width=4, depth=1))(torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"width": 0}, "width"),
        ({"depth": 0}, "depth"),
        ({"in_channels": 1.5}, "in_channels"),
        ({"dropout": 1.0}, "dropout"),
        ({"blocks_per_stage": -1}, "blocks_per_stage"),
        ({"width": 64, "max_width": 32}, "max_width"),
        ({"prior": 0.0}, "prior"),
    ],
)
def test_classifier_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ClassifierConfig(**kwargs)


# width, max_width, depth, each stage's output channels
STAGES = [
    (8, 256, 3, [16, 32, 64]),
    (32, 64, 4, [64, 64, 64, 64]),  # capped
    (4, 256, 1, [8]),
]


@pytest.mark.parametrize(("width", "max_width", "depth", "channels"), STAGES)
def test_classifier_stages_double_the_width_up_to_the_cap(width: int, max_width: int, depth: int,
                                                          channels: list[int]) -> None:
    config = ClassifierConfig(width=width, max_width=max_width, depth=depth)
    assert config.stage_widths() == channels
    model = PneumoniaCNN(config)
    x = model.stem(torch.zeros(1, 1, 64, 64))
    seen = []
    for block in model.blocks:
        x = block(x)
        seen.append(x.shape[1])
    assert seen == channels  # the stages build what the config says
    assert x.shape[-1] == 64 // 2 ** (depth + 1)  # total stride 2 ** (depth + 1)


# ---------------------------------------------------------------------------------------
# Detector
# ---------------------------------------------------------------------------------------

TARGETS = [
    torch.tensor([[100.0, 120.0, 300.0, 420.0], [380.0, 150.0, 560.0, 400.0]]),
    torch.zeros(0, 4),
]


@pytest.fixture(scope="module")
def detector() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_detector("yolov8n")


def test_detector_takes_grey_images_and_scores_one_class(detector: torch.nn.Module) -> None:
    detector.eval()
    try:
        with torch.no_grad():
            decoded, _ = detector(torch.zeros(2, 1, 64, 64))
    finally:
        detector.train()
    # per anchor at strides 8, 16 and 32: 4 box coordinates and 1 class score
    assert decoded.shape == (2, 4 + 1, 8 * 8 + 4 * 4 + 2 * 2)
    # the loss gains DetectionLoss documents (ultralytics' defaults)
    assert (detector.args.box, detector.args.cls, detector.args.dfl) == (7.5, 0.5, 1.5)


def test_detector_blocks_hold_every_parameter(detector: torch.nn.Module) -> None:
    """FSDP2 shards the blocks one by one, then the root: no parameter may sit outside them."""
    in_blocks = [id(p) for block in detector_blocks(detector) for p in block.parameters()]
    assert len(in_blocks) == len(set(in_blocks))
    assert set(in_blocks) == {id(p) for p in detector.parameters()}


def test_detector_unknown_name() -> None:
    with pytest.raises(ValueError, match="yolov8n"):
        build_detector("yolov5n")


def test_detection_loss_backward(detector: torch.nn.Module) -> None:
    detector.train()
    detector.zero_grad()
    criterion = DetectionLoss(detector)
    x = torch.randn(2, 1, 128, 128)
    total, items = criterion(detector(x), TARGETS, image_size=640)
    assert total.ndim == 0 and total.dtype == torch.float32 and torch.isfinite(total)
    assert set(items) == {"box", "cls", "dfl"}
    assert all(v.ndim == 0 and not v.requires_grad for v in items.values())
    assert total.item() == pytest.approx(sum(v.item() for v in items.values()), rel=1e-5)
    total.backward()
    grads = [p.grad for p in detector.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_detection_loss_does_not_scale_with_batch(detector: torch.nn.Module) -> None:
    """Duplicating a batch keeps BatchNorm statistics and the per-batch normalisation."""
    detector.train()
    criterion = DetectionLoss(detector)
    x = torch.randn(1, 1, 128, 128)
    with torch.no_grad():
        one, _ = criterion(detector(x), TARGETS[:1])
        two, _ = criterion(detector(x.repeat(2, 1, 1, 1)), TARGETS[:1] * 2)
    assert two.item() == pytest.approx(one.item(), rel=1e-4)


def test_detection_loss_empty_targets_and_bf16(detector: torch.nn.Module) -> None:
    detector.train()
    criterion = DetectionLoss(detector)
    x = torch.randn(2, 1, 64, 64)
    total, items = criterion(detector(x), [torch.zeros(0, 4), np.zeros((0, 4))])
    assert torch.isfinite(total) and items["box"] == 0 and items["dfl"] == 0 and items["cls"] > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        preds = detector(x)
        assert preds["boxes"].dtype == torch.bfloat16
        total, _ = criterion(preds, TARGETS)  # computed in float32 regardless
    assert total.dtype == torch.float32 and torch.isfinite(total)
    total.backward()
    with pytest.raises(ValueError, match="target entries"):
        criterion(detector(x), TARGETS[:1])
    with pytest.raises(ValueError, match=r"\(K, 4\)"):
        criterion(detector(x), [torch.zeros(2, 3), torch.zeros(0, 4)])
    single, _ = criterion(detector(x), [torch.tensor([10.0, 10.0, 300.0, 300.0]), []])  # one bare box
    assert torch.isfinite(single)


def test_postprocess_shapes(detector: torch.nn.Module) -> None:
    detector.eval()
    try:
        with torch.no_grad():
            preds = detector(torch.randn(3, 1, 128, 128))
        dets = postprocess_detections(preds, conf=0.0, max_det=7)
        assert len(dets) == 3
        for d in dets:
            assert d.dtype == np.float32 and d.ndim == 2 and d.shape[1] == 5 and 0 < len(d) <= 7
            assert np.all(np.diff(d[:, 4]) <= 0)  # descending confidence
            assert np.all(d[:, 2] >= d[:, 0]) and np.all(d[:, 3] >= d[:, 1])
        assert all(len(d) == 0 for d in postprocess_detections(preds[0], conf=1.0))
        with pytest.raises(ValueError, match="eval-mode"):
            postprocess_detections({"boxes": preds[0]})
    finally:
        detector.train()


def test_weights_round_trip(detector: torch.nn.Module, tmp_path: Path) -> None:
    path = tmp_path / "det.pt"
    torch.save({"model": detector.state_dict(), "step": 3}, path)  # a trainer-style checkpoint
    torch.manual_seed(1)
    loaded = build_detector("yolov8n", weights=path)
    for (k, a), b in zip(detector.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), k
    bare = tmp_path / "bare.pt"
    torch.save({f"module.{k}": v for k, v in detector.state_dict().items()}, bare)  # DDP keys
    missing, skipped = load_detector_weights(build_detector("yolov8n"), bare)
    assert missing == [] and skipped == []


def test_weights_three_channel_and_head_mismatch(
    detector: torch.nn.Module, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = {k: v.clone() for k, v in detector.state_dict().items()}
    w1 = state["model.0.conv.weight"]
    state["model.0.conv.weight"] = torch.cat([w1, 2 * w1, -w1], dim=1)  # sums back to 2 * w1
    head = "model.22.cv3.0.2.weight"  # the class conv: 80 classes in a COCO checkpoint
    state[head] = torch.zeros(80, *state[head].shape[1:])
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "coco_like.pt"
    torch.save(state, path)
    target = build_detector("yolov8n")
    with caplog.at_level(logging.INFO, logger="train.models"):
        missing, skipped = load_detector_weights(target, path)
    assert torch.allclose(target.state_dict()["model.0.conv.weight"], 2 * w1)
    assert missing == [head] and sorted(skipped) == sorted([head, "extra.weight"])
    assert "summing 3 input channels" in caplog.text and "missing keys" in caplog.text


def test_weights_refuse_pickled_checkpoint_unless_trusted(
    detector: torch.nn.Module, tmp_path: Path
) -> None:
    path = tmp_path / "ultralytics_style.pt"
    torch.save({"model": detector, "epoch": 1}, path)  # a pickled module, as ultralytics saves
    with pytest.raises(ValueError, match="trust_pickle"):
        build_detector("yolov8n", weights=path)
    loaded = build_detector("yolov8n", weights=path, trust_pickle=True)
    assert torch.equal(loaded.model[0].conv.weight, detector.model[0].conv.weight)
    with pytest.raises(FileNotFoundError):
        build_detector("yolov8n", weights=tmp_path / "nope.pt")
