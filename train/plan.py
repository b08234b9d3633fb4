"""The sample order of an epoch: a pure function of (seed, epoch, step), made from the
manifest's exact per-shard counts, independent of how many ranks and workers read it.

An epoch of a split with ``N`` samples and a *global* batch of ``B`` samples has
``S = ceil(N / B)`` steps. Its order is built from the manifest's exact per-shard counts:

1. The shards are permuted with a generator seeded by ``(seed, epoch)`` and their samples
   concatenated in that order.
2. The concatenation is cut into ``L`` *lanes* (``L`` divides ``B``; ``data.lanes``),
   contiguous ranges of ``floor(N/L)`` or ``ceil(N/L)`` samples. A lane is a few whole
   shards plus at most two partial ones at its ends.
3. Inside each lane, samples are permuted within consecutive windows of
   ``shuffle_window`` samples (seeded by ``(seed, epoch, lane)``), so a lane streams its
   shards sequentially while holding at most one window in memory.
4. Each lane is padded to exactly ``S * B / L`` slots by repeating its own last samples.
5. Global batch ``g`` is, for every lane in turn, that lane's ``g``-th chunk of ``B / L``
   samples: each batch mixes ``L`` different places of the shuffled shard sequence.

Rank ``r`` of ``W`` (``W`` must divide ``L``) owns lanes ``[r L/W, (r+1) L/W)``, i.e.
slots ``[r B/W, (r+1) B/W)`` of every global batch; its DataLoader workers split those
lanes among themselves. Hence every rank yields exactly ``S`` batches of ``B / W`` samples
whatever the shard sizes, a rank reads only its own lanes' shards, and the content of
global batch ``g`` does not depend on the world size or the number of workers: a run
resumed at step ``s`` (same seed and global batch, any valid world size) continues with
the batches the interrupted run would have produced.

**Repeat bound.** Training pads ``S * B - N < B`` slots per epoch, i.e. fewer than one
global batch of repeated samples; every other sample is seen exactly once. A lane pads at
most ``B / L`` slots, so as long as a lane holds at least ``B / L`` samples
(``N >= B``) no sample is seen more than twice in an epoch.

**Re-reads.** A shard cut by a lane boundary is opened by both lanes, each reading its own
samples of it (a format 1 shard is read and hashed whole by both: at most ``L - 1`` extra
partial shard reads per epoch; lower ``lanes`` to read less).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from shards.seeds import Salt

__all__ = ["EpochPlan", "Lane", "Span", "plan_epoch"]

_SHARD_ORDER, _WINDOW_ORDER = Salt.LOADER_SHARDS, Salt.LOADER_WINDOW  # see shards.seeds


@dataclasses.dataclass(frozen=True)
class Span:
    """Samples ``[start, stop)`` (file order) of one shard of the split."""

    shard: int
    """Index into the split's shard list."""
    start: int
    stop: int


@dataclasses.dataclass(frozen=True)
class Lane:
    """One sample stream of an epoch."""

    spans: tuple[Span, ...]
    """What the lane reads, in order; their concatenation is the lane's *raw* sequence."""
    order: np.ndarray
    """(slots,) raw positions in the order the lane yields them (padding included)."""
    valid: np.ndarray
    """(slots,) False where a padding slot must not count (evaluation)."""

    @property
    def real(self) -> int:
        """Number of distinct samples in the lane (its raw length)."""
        return sum(s.stop - s.start for s in self.spans)


@dataclasses.dataclass(frozen=True)
class EpochPlan:
    """The sample order of one epoch of one split; see the module docstring."""

    epoch: int
    steps: int
    """Batches per rank (and global batches) in the epoch."""
    global_batch: int
    chunk: int
    """Samples each lane gives to each global batch (``global_batch / lanes``)."""
    shard_order: tuple[int, ...]
    """Split shard indices in the epoch's order."""
    lanes: tuple[Lane, ...]
    shard_base: tuple[int, ...]
    """Global sample index (row in ``labels.zarr``) of each shard's first sample."""
    samples: int
    """``N``: distinct samples in the epoch."""

    @property
    def num_lanes(self) -> int:
        return len(self.lanes)

    @property
    def padding(self) -> int:
        """Slots of the epoch that repeat a sample: ``steps * global_batch - N < global_batch``."""
        return self.steps * self.global_batch - self.samples

    def lane_ids(self, lane: int) -> np.ndarray:
        """(slots,) global sample indices of a lane, in yield order."""
        spans = self.lanes[lane].spans
        raw = np.concatenate(
            [np.arange(s.start, s.stop) + self.shard_base[s.shard] for s in spans]
        ) if spans else np.zeros(0, np.int64)
        return raw[self.lanes[lane].order]

    def rank_lanes(self, rank: int, world: int) -> range:
        """The lanes rank ``rank`` of ``world`` owns."""
        if world < 1 or self.num_lanes % world:
            raise ValueError(f"world size {world} does not divide the {self.num_lanes} lanes")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside 0..{world - 1}")
        per = self.num_lanes // world
        return range(rank * per, (rank + 1) * per)

    def batches(self, rank: int = 0, world: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """(steps, global_batch / world) global sample indices and validity of one rank's
        batches (``world=1``: the global batches)."""
        lanes = self.rank_lanes(rank, world)
        ids = np.stack([self.lane_ids(i).reshape(self.steps, self.chunk) for i in lanes], 1)
        valid = np.stack([self.lanes[i].valid.reshape(self.steps, self.chunk) for i in lanes], 1)
        return ids.reshape(self.steps, -1), valid.reshape(self.steps, -1)


def _seed(*parts: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(p) for p in parts]))


def plan_epoch(
    sizes: Sequence[int],
    *,
    global_batch: int,
    lanes: int,
    seed: int,
    epoch: int,
    shuffle: bool = True,
    window: int = 64,
    pad_valid: bool = True,
    shard_base: Sequence[int] | None = None,
) -> EpochPlan:
    """The sample order of one epoch: a pure function of its arguments.

    Args:
        sizes: Samples per shard of the split, in manifest order.
        global_batch: Samples per step over all ranks.
        lanes: Parallel streams; must divide ``global_batch``.
        seed: Run seed.
        epoch: Epoch number (changes the shard order and the windows).
        shuffle: Permute shards and windows (training) or keep file order (evaluation).
        window: Samples permuted together inside a lane.
        pad_valid: Whether padding slots count (training) or are masked (evaluation).
        shard_base: Global index of each shard's first sample (default: cumulative sizes).

    Returns:
        The plan.

    Raises:
        ValueError: Bad sizes; an empty split; ``lanes`` not dividing ``global_batch``; a
            training split smaller than ``lanes`` (a lane would have nothing to repeat).
    """
    sizes = [int(n) for n in sizes]
    if any(n < 0 for n in sizes):
        raise ValueError(f"shard sizes must be >= 0, got {sizes}")
    total = sum(sizes)
    if total == 0:
        raise ValueError("the split has no samples")
    if global_batch < 1 or lanes < 1 or global_batch % lanes:
        raise ValueError(f"lanes={lanes} must divide global_batch={global_batch} (both >= 1)")
    if window < 1:
        raise ValueError(f"window={window}: must be >= 1")
    if pad_valid and total < lanes:
        raise ValueError(
            f"{total} samples cannot fill {lanes} lanes; lower the batch size or data.lanes"
        )
    base = list(np.cumsum([0, *sizes[:-1]])) if shard_base is None else list(shard_base)
    if len(base) != len(sizes):
        raise ValueError(f"shard_base has {len(base)} entries for {len(sizes)} shards")
    order = _seed(seed, epoch, _SHARD_ORDER).permutation(len(sizes)) if shuffle else np.arange(len(sizes))
    shard_order = tuple(int(i) for i in order if sizes[i] > 0)
    chunk = global_batch // lanes
    steps = math.ceil(total / global_batch)
    slots = steps * chunk

    # Cumulative start of each shard in the epoch's concatenation.
    starts = np.cumsum([0] + [sizes[i] for i in shard_order])
    lane_list = []
    for lane in range(lanes):
        lo, hi = lane * total // lanes, (lane + 1) * total // lanes
        spans = _spans(shard_order, starts, lo, hi)
        n = hi - lo
        if n == 0:  # evaluation of a split smaller than the lanes: one masked filler
            spans = _spans(shard_order, starts, 0, 1)
            lane_list.append(Lane(spans, np.zeros(slots, np.int64), np.zeros(slots, bool)))
            continue
        real = _window_order(n, window, _seed(seed, epoch, _WINDOW_ORDER, lane) if shuffle else None)
        pad = slots - n
        pad_pos = real[(np.arange(pad) + n - pad) % n]  # the lane's last samples, cycled
        valid = np.concatenate([np.ones(n, bool), np.full(pad, pad_valid)])
        lane_list.append(Lane(spans, np.concatenate([real, pad_pos]), valid))
    return EpochPlan(
        epoch=epoch, steps=steps, global_batch=global_batch, chunk=chunk,
        shard_order=shard_order, lanes=tuple(lane_list), shard_base=tuple(int(b) for b in base),
        samples=total,
    )


def _spans(shard_order: Sequence[int], starts: np.ndarray, lo: int, hi: int) -> tuple[Span, ...]:
    """The pieces of shards covering positions ``[lo, hi)`` of the concatenation."""
    out = []
    for k, shard in enumerate(shard_order):
        a, b = max(lo, int(starts[k])), min(hi, int(starts[k + 1]))
        if a < b:
            out.append(Span(shard, a - int(starts[k]), b - int(starts[k])))
    return tuple(out)


def _window_order(n: int, window: int, rng: np.random.Generator | None) -> np.ndarray:
    """``0..n-1`` permuted within consecutive windows (identity without ``rng``)."""
    order = np.arange(n, dtype=np.int64)
    if rng is not None:
        for a in range(0, n, window):
            order[a : a + window] = a + rng.permutation(min(window, n - a))
    return order
