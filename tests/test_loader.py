"""The streaming loader: the sample order as a pure function (plan tables), the streaming
reader against the plan on real shards, exactly-once evaluation, checksums, augmentation
and the config."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from shards.manifest import SHARDS_DIR, read_manifest
from shards.reader import ShardChecksumError
from train.augment import AugmentParams, augment, draw_params, step_params
from train.config import AugmentConfig, DataConfig, TrainConfig, dump_toml, load_toml
from train.data import HostBatch, ShardLoader, plan_epoch, read_split, to_device

UNEVEN = [7, 3, 5, 0, 5, 1, 9, 4]  # 34 samples, one empty shard

# sizes, global batch, lanes
PLAN_CASES = [
    (UNEVEN, 4, 4),
    (UNEVEN, 8, 4),
    (UNEVEN, 6, 6),
    (UNEVEN, 6, 3),
    ([4, 4, 4, 4, 2], 4, 4),  # the ingested_small train split
    ([256] * 5 + [17], 64, 16),
    ([1] * 13, 4, 2),
    ([40], 8, 8),  # one shard cut into 8 lanes
]


def _counts(plan) -> np.ndarray:
    ids, _ = plan.batches()
    return np.bincount(ids.ravel(), minlength=plan.samples)


@pytest.mark.parametrize(("sizes", "batch", "lanes"), PLAN_CASES)
def test_every_rank_gets_the_same_number_of_full_batches(sizes, batch, lanes):
    plan = plan_epoch(sizes, global_batch=batch, lanes=lanes, seed=1, epoch=0)
    n = sum(sizes)
    assert plan.steps == -(-n // batch)
    for world in (w for w in (1, 2, 3, 4, 8) if lanes % w == 0):
        for rank in range(world):
            ids, valid = plan.batches(rank, world)
            assert ids.shape == (plan.steps, batch // world)
            assert valid.all()  # training: the padding counts


@pytest.mark.parametrize(("sizes", "batch", "lanes"), PLAN_CASES)
def test_each_sample_once_plus_fewer_than_one_batch_of_repeats(sizes, batch, lanes):
    plan = plan_epoch(sizes, global_batch=batch, lanes=lanes, seed=3, epoch=2)
    counts = _counts(plan)
    n = sum(sizes)
    assert (counts >= 1).all()
    repeats = int((counts - 1).sum())
    assert repeats == plan.padding == plan.steps * batch - n < batch
    if n >= batch:
        assert counts.max() <= 2


@pytest.mark.parametrize(("sizes", "batch", "lanes"), PLAN_CASES)
def test_global_batches_do_not_depend_on_the_world_size(sizes, batch, lanes):
    plan = plan_epoch(sizes, global_batch=batch, lanes=lanes, seed=5, epoch=1)
    whole, _ = plan.batches()
    for world in (w for w in (2, 3, 4, 8) if lanes % w == 0):
        parts = [plan.batches(r, world)[0] for r in range(world)]
        np.testing.assert_array_equal(np.concatenate(parts, axis=1), whole)


def test_order_is_a_pure_function_of_seed_and_epoch():
    a = plan_epoch(UNEVEN, global_batch=4, lanes=4, seed=7, epoch=3).batches()[0]
    b = plan_epoch(UNEVEN, global_batch=4, lanes=4, seed=7, epoch=3).batches()[0]
    np.testing.assert_array_equal(a, b)
    orders = {plan_epoch(UNEVEN, global_batch=4, lanes=4, seed=7, epoch=e).shard_order for e in range(4)}
    assert len(orders) == 4  # the shard order changes every epoch
    other = plan_epoch(UNEVEN, global_batch=4, lanes=4, seed=8, epoch=3).batches()[0]
    assert not np.array_equal(a, other)


def test_lanes_read_contiguous_pieces_of_the_shuffled_shards():
    plan = plan_epoch(UNEVEN, global_batch=8, lanes=4, seed=0, epoch=0)
    pieces = [(s.shard, s.start, s.stop) for lane in plan.lanes for s in lane.spans]
    # Concatenated, the lanes' spans are the shards in the epoch's order, each exactly once.
    flat = [(sh, i) for sh, a, b in pieces for i in range(a, b)]
    expected = [(sh, i) for sh in plan.shard_order for i in range(UNEVEN[sh])]
    assert flat == expected
    assert len(pieces) <= len(plan.shard_order) + plan.num_lanes - 1  # bounded re-reads


@pytest.mark.parametrize(("sizes", "batch", "lanes", "world"), [
    ([4, 2], 8, 4, 2), ([4, 2], 2, 2, 2), ([1], 8, 8, 4), (UNEVEN, 6, 6, 3),
])
def test_evaluation_plan_masks_padding_so_each_sample_counts_once(sizes, batch, lanes, world):
    plan = plan_epoch(sizes, global_batch=batch, lanes=lanes, seed=0, epoch=0,
                      shuffle=False, pad_valid=False)
    seen = []
    for rank in range(world):
        ids, valid = plan.batches(rank, world)
        seen += ids[valid].tolist()
    assert sorted(seen) == list(range(sum(sizes)))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"global_batch": 6, "lanes": 4}, "must divide"),
    ({"global_batch": 64, "lanes": 64}, "cannot fill"),
    ({"global_batch": 4, "lanes": 4, "window": 0}, "window"),
])
def test_plan_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        plan_epoch(UNEVEN, seed=0, epoch=0, **kwargs)


# --------------------------------------------------------------------------- real shards


def _ids(batches: list[HostBatch]) -> np.ndarray:
    return np.stack([b.index.numpy() for b in batches])


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_matches_the_plan_on_uneven_shards(ingested_small: Path, workers: int):
    info = read_split(ingested_small, "train")
    assert len(set(info.sizes)) > 1  # the fixture's shards are uneven (4, 4, 4, 4, 2)
    for world in (1, 2):
        per_rank = []
        for rank in range(world):
            loader = ShardLoader(info, rank=rank, world=world, global_batch=4, lanes=4,
                                 workers=workers, seed=11)
            batches = list(loader.epoch(1))
            assert len(batches) == loader.steps
            assert all(len(b) == 4 // world for b in batches)
            np.testing.assert_array_equal(_ids(batches), loader.plan(1).batches(rank, world)[0])
            # the batch content agrees with labels.zarr
            for b in batches:
                assert [str(info.keys[i]) for i in b.index.tolist()] == b.keys
                np.testing.assert_array_equal(b.target.numpy(), info.targets[b.index.numpy()])
                assert b.images.dtype == torch.uint8 and b.images.shape[1:] == (64, 64)
            per_rank.append(_ids(batches))
        np.testing.assert_array_equal(np.concatenate(per_rank, 1), loader.plan(1).batches()[0])


def test_resume_mid_epoch_continues_with_the_same_batches(ingested_small: Path):
    info = read_split(ingested_small, "train")
    full = ShardLoader(info, rank=1, world=2, global_batch=4, lanes=4, workers=1, seed=2)
    expected = _ids(list(full.epoch(3)))
    for first in (1, 3, full.steps - 1):
        resumed = list(full.epoch(3, first_step=first))
        assert [b.step for b in resumed] == list(range(first, full.steps))
        np.testing.assert_array_equal(_ids(resumed), expected[first:])
    # a 2-rank run resumed on one rank: the same global batches from the same step
    single = ShardLoader(info, rank=0, world=1, global_batch=4, lanes=4, workers=0, seed=2)
    np.testing.assert_array_equal(_ids(list(single.epoch(3, first_step=2)))[:, 2:], expected[2:])


def test_workers_reuse_their_shared_batch_memory_and_give_the_same_batches(tmp_path: Path, monkeypatch):
    from train import batches, data as loader_module
    from train.peer_bench import make_dataset

    info = read_split(make_dataset(tmp_path / "ds", 240, size=32, shard_size=40), "train")
    sent: list[int] = []
    join = batches._join

    def spy(items, *args, **kwargs):
        sent.extend(it["images"].data_ptr() for it in items)
        return join(items, *args, **kwargs)

    monkeypatch.setattr(loader_module, "_join", spy)
    inline = ShardLoader(info, rank=0, world=1, global_batch=4, lanes=2, workers=0, seed=3, window=8)
    want = [(b.keys, b.images.clone(), b.target, b.boxes, b.box_index) for b in inline.epoch(1)]
    sent.clear()
    two = ShardLoader(info, rank=0, world=1, global_batch=4, lanes=2, workers=2, seed=3, window=8)
    got = [(b.keys, b.images.clone(), b.target, b.boxes, b.box_index) for b in two.epoch(1)]
    assert len(got) == len(want) == 60
    for a, b in zip(want, got):
        assert a[0] == b[0] and all(torch.equal(x, y) for x, y in zip(a[1:], b[1:]))
    # 120 items over 60 steps: each worker cycles through a few buffers (those its lane's
    # shuffle window fills ahead, 4 steps, and those in flight), which the main process keeps
    # mapped, instead of a new shared-memory file per item.
    assert len(sent) == 120 and len(set(sent)) <= 24


THREAD_CASES = [0, 1, 2, 8]  # 0: the lanes read in the consumer's thread; 8: more threads than lanes


@pytest.mark.parametrize("threads", THREAD_CASES)
def test_reader_threads_give_the_same_batches(ingested_small: Path, threads: int):
    info = read_split(ingested_small, "train")
    inline = ShardLoader(info, rank=0, world=1, global_batch=4, lanes=4, workers=0, seed=7, threads=0)
    loader = ShardLoader(info, rank=0, world=1, global_batch=4, lanes=4, workers=0, seed=7, threads=threads)
    for first in (0, 2):  # a whole epoch, and one resumed mid-epoch
        want, got = list(inline.epoch(1, first)), list(loader.epoch(1, first))
        assert [b.step for b in got] == [b.step for b in want]
        for a, b in zip(want, got):
            assert a.keys == b.keys and torch.equal(a.index, b.index) and torch.equal(a.images, b.images)
            assert torch.equal(a.boxes, b.boxes) and torch.equal(a.box_index, b.box_index)


def _flip_pixel(data: Path, shard: int) -> str:
    name = read_manifest(data).shards_of("train")[shard].name
    path = data / SHARDS_DIR / name
    raw = bytearray(path.read_bytes())
    raw[2000] ^= 0xFF  # inside the first image's pixels
    path.write_bytes(bytes(raw))
    return name


@pytest.mark.parametrize("threads", THREAD_CASES)
def test_reader_threads_raise_the_same_error_at_the_same_step(ingested_small: Path, tmp_path: Path, threads: int):
    data = tmp_path / "ds"
    shutil.copytree(ingested_small, data)
    names = {_flip_pixel(data, k) for k in (1, 3)}  # two lanes fail: the lower one's error comes first

    def run(n: int) -> tuple[list[int], str]:
        loader = ShardLoader(read_split(data, "train"), rank=0, world=1, global_batch=4, lanes=4,
                             workers=0, seed=3, threads=n)
        steps: list[int] = []
        with pytest.raises(ShardChecksumError) as caught:
            for b in loader.epoch(0):
                steps.append(b.step)
        assert any(n in str(caught.value) for n in names)
        return steps, str(caught.value)

    assert run(threads) == run(0)


@pytest.mark.parametrize("threads", [1, 2])
def test_leaving_an_epoch_early_stops_the_reader_threads(ingested_small: Path, threads: int):
    info = read_split(ingested_small, "train")
    loader = ShardLoader(info, rank=0, world=1, global_batch=4, lanes=4, workers=0, seed=1, threads=threads)
    before = set(threading.enumerate())
    epoch = loader.epoch(0)
    next(epoch)
    assert any(t.name.startswith("lane-reader") for t in set(threading.enumerate()) - before)
    epoch.close()
    assert not [t for t in set(threading.enumerate()) - before if t.name.startswith("lane-reader")]


def test_a_negative_thread_count_is_refused(ingested_small: Path):
    with pytest.raises(ValueError, match="threads=-1"):
        ShardLoader(read_split(ingested_small, "train"), rank=0, world=1, global_batch=4, lanes=4, threads=-1)


@pytest.mark.parametrize("workers", [0, 2])  # 2: the workers' items are joined into pooled memory
def test_batch_memory_is_reused_only_once_the_consumer_drops_it(ingested_small: Path, workers: int):
    info = read_split(ingested_small, "train")
    loader = ShardLoader(info, rank=0, world=1, global_batch=4, lanes=2, workers=workers, seed=4)
    held, copies = [], []
    for b in loader.epoch(0):  # every batch kept: none may be written again
        held.append(b)
        copies.append(b.images.clone())
    assert len({b.images.data_ptr() for b in held}) == len(held)
    assert {b.images.data_ptr() for b in held} <= {a.ctypes.data for a in loader._pool._lent}
    assert all(torch.equal(b.images, c) for b, c in zip(held, copies))
    views = [b.images[1:] for b in held]  # a view keeps its batch's memory too
    del held
    assert all(torch.equal(v, c[1:]) for v, c in zip(views, copies))
    first = {b.images.data_ptr() for b in loader.epoch(1)}  # each dropped at the next step
    assert {b.images.data_ptr() for b in loader.epoch(2)} <= first  # the same memory again
    assert all(torch.equal(v, c[1:]) for v, c in zip(views, copies))


def test_pinned_loaders_read_straight_into_pinned_batches(ingested_small: Path, monkeypatch):
    """With ``pin_memory`` and no worker processes, each batch is allocated pinned and the
    images are read into it (no pinning copy after). Pinning itself needs CUDA: the
    allocation is stood in for here, the path around it runs as on a GPU host."""
    import train.data as data_mod
    from train.data import LaneDataset

    made: list[torch.Tensor] = []
    monkeypatch.setattr(data_mod, "_pinned_empty", lambda shape: made.append(torch.empty(shape, dtype=torch.uint8))
                        or made[-1])
    info = read_split(ingested_small, "train")
    loader = ShardLoader(info, rank=0, world=1, global_batch=4, lanes=2, seed=6)
    plan = loader.plan(0)
    items = list(LaneDataset(info, plan, plan.rank_lanes(0, 1), 0, False, pin_memory=True))
    assert sorted(it["images"].data_ptr() for it in items) == sorted(t.data_ptr() for t in made)
    expected = [b.images for b in loader.epoch(0)]
    assert all(torch.equal(it["images"], e) for it, e in zip(items, expected))


def test_boxes_follow_their_samples(ingested_small: Path):
    info = read_split(ingested_small, "train")
    loader = ShardLoader(info, rank=0, world=1, global_batch=6, lanes=3, workers=0, seed=0)
    from shards.labels import read_labels

    labels = read_labels(ingested_small / "labels.zarr")
    n_boxes = 0
    for b in loader.epoch(0):
        for i, g in enumerate(b.index.tolist()):
            np.testing.assert_allclose(b.boxes[b.box_index == i].numpy(), labels.boxes_of(g))
            n_boxes += len(labels.boxes_of(g))
    assert n_boxes > 0


def test_evaluation_loader_sees_every_sample_once(ingested_small: Path):
    info = read_split(ingested_small, "val")
    seen = []
    for rank in range(2):
        loader = ShardLoader(info, rank=rank, world=2, global_batch=8, lanes=4, workers=2,
                             train=False, with_meta=True)
        for b in loader.epoch(0):
            assert len(b) == 4
            seen += b.index[b.valid].tolist()
            assert b.meta is not None and {"patient_id", "transform"} <= set(b.meta[0])
    assert sorted(seen) == list(range(info.shard_base[0], info.shard_base[0] + info.samples))


@pytest.mark.parametrize("workers", [0, 1])
def test_a_changed_shard_stops_the_loader_naming_it(ingested_small: Path, tmp_path: Path, workers: int):
    data = tmp_path / "ds"
    shutil.copytree(ingested_small, data)
    name = read_manifest(data).shards_of("train")[1].name
    path = data / SHARDS_DIR / name
    raw = bytearray(path.read_bytes())
    raw[2000] ^= 0xFF  # inside the first image's pixels
    path.write_bytes(bytes(raw))
    loader = ShardLoader(read_split(data, "train"), rank=0, world=1, global_batch=4, lanes=2,
                         workers=workers, seed=0)
    with pytest.raises((ShardChecksumError, RuntimeError), match=name):
        for _ in loader.epoch(0):
            pass


def test_to_device_makes_float_images_and_scales_boxes():
    batch = HostBatch(step=0, images=torch.full((2, 64, 64), 255, dtype=torch.uint8),
                      target=torch.tensor([1, 0]), boxes=torch.tensor([[8.0, 16.0, 32.0, 48.0]]),
                      box_index=torch.tensor([0]), index=torch.tensor([0, 1]),
                      valid=torch.tensor([True, True]), keys=["a", "b"])
    dev = to_device(batch, torch.device("cpu"), 32)
    assert dev.images.shape == (2, 1, 32, 32) and dev.images.dtype == torch.float32
    assert float(dev.images.max()) == pytest.approx(1.0)
    np.testing.assert_allclose(dev.boxes.numpy(), [[4.0, 8.0, 16.0, 24.0]])
    assert dev.size == 32


# --------------------------------------------------------------------------- augmentation


def _bright_box_image() -> tuple[torch.Tensor, torch.Tensor]:
    img = torch.zeros(1, 1, 64, 64)
    img[..., 10:30, 5:25] = 1.0
    return img, torch.tensor([[5.0, 10.0, 25.0, 30.0]])


# flip, scale, shift x, shift y
AUG_CASES = [
    (False, 1.0, 0.0, 0.0),
    (True, 1.0, 0.0, 0.0),
    (False, 1.2, 0.1, -0.05),
    (True, 0.8, -0.1, 0.1),
]


@pytest.mark.parametrize(("flip", "scale", "sx", "sy"), AUG_CASES)
def test_boxes_move_with_the_pixels(flip, scale, sx, sy):
    img, boxes = _bright_box_image()
    params = AugmentParams(torch.tensor([flip]), torch.tensor([scale]), torch.tensor([[sx, sy]]),
                           torch.zeros(1), torch.ones(1))
    out, new_boxes, index = augment(img, boxes, torch.tensor([0]), params)
    ys, xs = torch.nonzero(out[0, 0] > 0.5, as_tuple=True)
    bright = [xs.min().item(), ys.min().item(), xs.max().item() + 1, ys.max().item() + 1]
    np.testing.assert_allclose(new_boxes[0].numpy(), bright, atol=1.0)
    assert index.tolist() == [0]


def test_identity_parameters_change_nothing():
    img = torch.rand(3, 1, 32, 32)
    boxes = torch.tensor([[1.0, 2.0, 10.0, 12.0]])
    out, b, _ = augment(img, boxes, torch.tensor([1]), AugmentParams.identity(3))
    torch.testing.assert_close(out, img, atol=1e-5, rtol=0)
    torch.testing.assert_close(b, boxes)


def test_boxes_pushed_out_of_the_image_are_dropped():
    img, boxes = _bright_box_image()
    params = AugmentParams(torch.tensor([False]), torch.tensor([1.0]), torch.tensor([[-0.45, 0.0]]),
                           torch.zeros(1), torch.ones(1))
    _, kept, index = augment(img, boxes, torch.tensor([0]), params)
    assert kept.shape == (0, 4) and index.numel() == 0


def test_augmentation_is_seeded_and_independent_of_the_world_size():
    cfg = AugmentConfig()
    whole = step_params(cfg, seed=1, epoch=2, step=3, global_batch=8, rank=0, world=1)
    halves = [step_params(cfg, seed=1, epoch=2, step=3, global_batch=8, rank=r, world=2) for r in (0, 1)]
    torch.testing.assert_close(torch.cat([h.scale for h in halves]), whole.scale)
    torch.testing.assert_close(torch.cat([h.shift for h in halves]), whole.shift)
    again = step_params(cfg, seed=1, epoch=2, step=3, global_batch=8, rank=0, world=1)
    torch.testing.assert_close(again.contrast, whole.contrast)
    other = step_params(cfg, seed=1, epoch=2, step=4, global_batch=8, rank=0, world=1)
    assert not torch.equal(other.scale, whole.scale)
    p = draw_params(cfg, 1000, torch.Generator().manual_seed(0))
    assert 0.4 < p.flip.float().mean() < 0.6
    assert float((p.scale - 1).abs().max()) <= cfg.scale


# --------------------------------------------------------------------------- config


def test_config_round_trips_through_toml(tmp_path: Path):
    cfg = TrainConfig.from_dict({
        "out": str(tmp_path / "run"), "epochs": 3, "max_steps": 7,
        "data": {"path": str(tmp_path / "ds"), "batch_size": 12, "image_size": 96},
        "model": {"task": "detect", "name": "yolov8s"},
        "optim": {"lr": 0.0005, "betas": [0.8, 0.99]},
        "parallel": {"strategy": "fsdp", "amp": "fp16"},
    })
    path = tmp_path / "config.toml"
    path.write_text(dump_toml(cfg))
    again = TrainConfig.from_dict(load_toml(path))
    assert again == cfg
    assert again.data.num_lanes == 12 and DataConfig(batch_size=64).num_lanes == 16


@pytest.mark.parametrize("name", [
    "tab\there", "new\nline\r", "bell\x07 escape\x1b del\x7f nul\x00", 'quote" back\\slash',
    "triple\"\"\" ''' quotes", "unicode \u00e9 \u2713 \U0001f600", "\u2028 line separator",
])
def test_config_toml_round_trips_control_characters_in_paths(tmp_path: Path, name: str):
    cfg = TrainConfig.from_dict({
        "out": str(tmp_path / name / "run"), "data": {"path": f"/data/{name}"},
        "model": {"task": "detect", "weights": f"{name}.pt", "trust_weights": True},
    })
    text = dump_toml(cfg)
    # TOML allows a raw tab in a string; every other control character must be escaped
    assert not any(ord(c) < 0x20 and c not in "\t\n" or c == "\x7f" for c in text)
    path = tmp_path / "config.toml"
    path.write_text(text, encoding="utf-8")
    assert TrainConfig.from_dict(load_toml(path)) == cfg


@pytest.mark.parametrize(("data", "message"), [
    ({"epoch": 3}, "unknown config key 'epoch'"),
    ({"data": {"batchsize": 3}}, r"unknown key\(s\) \['batchsize'\] in \[data\]"),
    ({"data": {"batch_size": 0}}, "data.batch_size=0"),
    ({"data": {"batch_size": 8, "lanes": 3}}, "does not divide"),
    ({"data": {"threads": -1}}, "data.threads=-1"),
    ({"data": {"image_size": 100}}, "multiples of 32"),
    ({"model": {"task": "segment"}}, "model.task='segment'"),
    ({"model": {"task": "classify", "name": "yolov8n"}}, "model.name"),
    ({"parallel": {"amp": "fp8"}}, "parallel.amp='fp8'"),
    ({"optim": {"lr": -1}}, "optim.lr=-1"),
    ({"augment": {"flip": 2}}, "augment.flip=2"),
    ({"eval": {"bn_batches": -1}}, "eval.bn_batches=-1"),
])
def test_config_errors_name_the_bad_value(data, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig.from_dict(data)
