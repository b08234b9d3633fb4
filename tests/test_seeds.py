"""shards.seeds: every derived value is pinned, since a seed's meaning (the split and shard order
of existing datasets, the sample order, dropout and augmentation of resumable runs) must never
change; and the loader, the trainer and the ingest draw from these helpers."""

from __future__ import annotations

import pytest
import torch

from ingest.plan import assign_splits, make_plan
from shards import seeds
from train.augment import draw_params, step_params
from train.config import AugmentConfig
from train.data import plan_epoch

# helper, arguments, the value it derived when the helper was introduced
PINNED = [
    (seeds.step_seed, (0, 0, 0), 4131194773225152112),
    (seeds.step_seed, (7, 123, 1), 8221925751406107404),
    (seeds.augment_seed, (0, 0, 0), 5351598442195337711),
    (seeds.augment_seed, (7, 3, 5), 3090971362512590719),
    (seeds.split_hash, (0, "p-1"), 0.049999170041514225),
    (seeds.split_hash, (42, "0004cfab-14fd-4e49-80ba-63a80b6bddd6"), 0.4647157424513929),
    (seeds.shard_order_hash, (0, "p-1"), 0.9550798737402121),
    (seeds.shard_order_hash, (42, "0004cfab-14fd-4e49-80ba-63a80b6bddd6"), 0.33938653529494134),
]


@pytest.mark.parametrize(("helper", "args", "expected"), PINNED,
                         ids=[f"{h.__name__}{a}" for h, a, _ in PINNED])
def test_derived_value_is_pinned(helper, args, expected):
    assert helper(*args) == expected


# helper, arguments, its permutation of range(8)
PINNED_PERMUTATIONS = [
    (seeds.loader_shard_rng, (0, 0), [2, 4, 3, 6, 5, 0, 1, 7]),
    (seeds.loader_shard_rng, (7, 3), [3, 5, 0, 4, 2, 7, 1, 6]),
    (seeds.loader_window_rng, (0, 0, 0), [4, 1, 5, 3, 6, 7, 2, 0]),
    (seeds.loader_window_rng, (7, 3, 2), [6, 2, 0, 4, 7, 5, 3, 1]),
]


@pytest.mark.parametrize(("helper", "args", "expected"), PINNED_PERMUTATIONS,
                         ids=[f"{h.__name__}{a}" for h, a, _ in PINNED_PERMUTATIONS])
def test_derived_permutation_is_pinned(helper, args, expected):
    assert helper(*args).permutation(8).tolist() == expected


def test_every_purpose_has_its_own_salt():
    assert len({int(s) for s in seeds.Salt}) == len(seeds.Salt)


def test_shard_order_is_not_the_split_order():
    pids = [f"p{i}" for i in range(50)]
    by_split = sorted(pids, key=lambda p: seeds.split_hash(3, p))
    by_shard = sorted(pids, key=lambda p: seeds.shard_order_hash(3, p))
    assert by_split != by_shard


def test_loader_plan_draws_its_shard_order_from_the_helper():
    sizes = [1] * 8  # one sample per shard: the sample order is the shard order
    plan = plan_epoch(sizes, global_batch=8, lanes=1, seed=7, epoch=3, shuffle=True, window=1)
    ids, _ = plan.batches()
    assert ids.ravel().tolist() == seeds.loader_shard_rng(7, 3).permutation(8).tolist()


def test_step_params_draw_from_the_augment_seed():
    cfg = AugmentConfig(enabled=True)
    drawn = draw_params(cfg, 4, torch.Generator().manual_seed(seeds.augment_seed(1, 2, 3)))
    got = step_params(cfg, seed=1, epoch=2, step=3, global_batch=4, rank=0, world=1)
    assert torch.equal(got.scale, drawn.scale) and torch.equal(got.flip, drawn.flip)


def test_ingest_fills_shards_in_shard_order_hash_order(tmp_path):
    pids = [f"p{i:02d}" for i in range(12)]
    plan = make_plan(dicom_dir=tmp_path, out=tmp_path / "out", labels=None, label_problems=[],
                     shard_size=100, val_fraction=0.0, seed=5, processing={},
                     inputs=[(f"{pid}.dcm", 1000) for pid in pids])
    planned = [s.patient_id for t in plan.tasks for s in t.samples]
    assert planned == sorted(pids, key=lambda p: seeds.shard_order_hash(5, p))
    assert seeds.shard_order_hash(5, "x") == seeds.split_hash(6, "x")


def test_ingest_splits_by_the_split_hash():
    patients = {f"p{i:02d}": 0 for i in range(20)}
    split = assign_splits(patients, 0.25, seed=9)
    lowest = sorted(patients, key=lambda p: seeds.split_hash(9, p))[:5]
    assert sorted(p for p, s in split.items() if s == "val") == sorted(lowest)
