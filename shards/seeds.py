"""Every random stream the project derives from a user's ``--seed``, one function per purpose.

Each purpose mixes its own salt (:class:`Salt`) into numpy's ``SeedSequence`` entropy, or its
own offset into :func:`unit_hash`, so no two purposes draw from the same stream. The values are
part of what a seed means: they fix the val split and the shard order of every dataset already
written and the sample order, dropout and augmentation of every run that may be resumed, so they
never change. ``tests/test_seeds.py`` pins them.

Both ``ingest/`` (splits, shard order) and ``train/`` (loader order, steps, augmentation) derive
seeds, and neither imports the other: the helper lives here, below both.
"""

from __future__ import annotations

import enum
import hashlib

import numpy as np

__all__ = [
    "Salt",
    "augment_seed",
    "loader_shard_rng",
    "loader_window_rng",
    "shard_order_hash",
    "split_hash",
    "step_seed",
    "unit_hash",
]


class Salt(enum.IntEnum):
    """The constant each ``SeedSequence`` purpose adds to its entropy."""

    LOADER_SHARDS = 0
    """The training loader's shard permutation of an epoch: ``(seed, epoch, salt)``."""
    LOADER_WINDOW = 1
    """The loader's shuffle-window permutations of one lane: ``(seed, epoch, salt, lane)``."""
    STEP = 0xD20
    """Torch's global generator at one training step (dropout): ``(seed, step, rank, salt)``."""
    AUGMENT = 0xA06
    """The augmentation parameters of one step's global batch: ``(seed, epoch, step, salt)``."""


def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(e) for e in entropy]))


def _int63(*entropy: int) -> int:
    """A non-negative int below 2**63 (what ``torch.manual_seed`` and generators accept)."""
    word = np.random.SeedSequence([int(e) for e in entropy]).generate_state(1, np.uint64)[0]
    return int(word >> np.uint64(1))


def loader_shard_rng(seed: int, epoch: int) -> np.random.Generator:
    """The generator that permutes a split's shards in ``epoch``."""
    return _rng(seed, epoch, Salt.LOADER_SHARDS)


def loader_window_rng(seed: int, epoch: int, lane: int) -> np.random.Generator:
    """The generator of ``lane``'s shuffle-window permutations in ``epoch``."""
    return _rng(seed, epoch, Salt.LOADER_WINDOW, lane)


def step_seed(seed: int, step: int, rank: int) -> int:
    """The seed of torch's global generator for optimizer step ``step`` on ``rank``, so that a
    resumed run repeats the interrupted run's dropout exactly."""
    return _int63(seed, step, rank, Salt.STEP)


def augment_seed(seed: int, epoch: int, step: int) -> int:
    """The seed of the generator that draws one step's augmentation for the whole global
    batch (``step`` counts within ``epoch``); each rank then takes its own slots."""
    return _int63(seed, epoch, step, Salt.AUGMENT)


def unit_hash(seed: int, text: str) -> float:
    """A deterministic pseudo-random number in [0, 1) from (seed, text): the first 8 bytes of
    ``sha256(f"{seed}\\0{text}")``. Independent of the order and number of other texts."""
    digest = hashlib.sha256(f"{seed}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_hash(seed: int, patient_id: str) -> float:
    """The rank of a patient within its stratum when the ingest assigns the val split."""
    return unit_hash(seed, patient_id)


def shard_order_hash(seed: int, patient_id: str) -> float:
    """The rank of a patient within its split when the ingest fills the shards.

    Offset by one from :func:`split_hash` so that within a dataset the shard order is
    independent of the split. Seed ``s``'s shard order is thus the same ranking as seed
    ``s + 1``'s split, which couples two different datasets only; it is kept because the
    shards of every existing dataset were ordered by it.
    """
    return unit_hash(seed + 1, patient_id)
