"""The streaming loader: shards -> per-rank uint8 batches, in an order that is a pure function
of (seed, epoch, step).

The sample order (:func:`plan_epoch`)
-------------------------------------
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

**QA exclusions.** ``read_split(..., exclude_qa=MASK)`` leaves out the samples whose QA
bitmask (``labels.zarr``'s ``qa``) shares a bit with ``MASK`` before anything is planned: the
plan is made over the kept samples of each shard (``SplitInfo.sizes``), so every promise
above holds for them, and the reader passes the others over as it streams each shard
(their members still checked where they lie inside a lane's range).

Evaluation uses the same machinery without shuffling and with the padding slots marked
invalid (``valid`` false), so over all ranks every validation sample is seen exactly once.

Every shard is read with :func:`shards.reader.read_into`: each image goes straight from the
file into its row of the batch (one copy; the shuffle moves indices, never pixels), and each
sample is checked against the manifest's per-sample xxh3 digests before its batch is handed
out (a format 1 shard, which has none, is read to its end and checked against its sha256).
Every key is checked against ``labels.zarr``. Images stay uint8 until :func:`to_device`
moves them to the device, where they become float.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.origin import ShardOrigin, open_origin
from shards.format import FormatError
from shards.labels import LabelTable
from shards.manifest import Manifest, ShardInfo
from shards.reader import ShardChecksumError, read_into
from shards.seeds import Salt
from shards.store import read_labels_from, read_manifest_from
from train.forking import exit_with_rank, worker_context

__all__ = [
    "DeviceBatch",
    "EpochPlan",
    "HostBatch",
    "Lane",
    "ShardLoader",
    "SplitInfo",
    "plan_epoch",
    "read_split",
    "to_device",
]

log = logging.getLogger(__name__)

_SHARD_ORDER, _WINDOW_ORDER = Salt.LOADER_SHARDS, Salt.LOADER_WINDOW  # see shards.seeds


# --------------------------------------------------------------------------- the plan


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


# --------------------------------------------------------------------------- the split


@dataclasses.dataclass(frozen=True)
class SplitInfo:
    """What the loader needs to know of one split of a dataset."""

    origin: ShardOrigin
    """Where the shards are read from (the dataset folder, or a cache of a remote one)."""
    split: str
    shards: tuple[ShardInfo, ...]
    shard_base: tuple[int, ...]
    """Global index (labels.zarr row) of each shard's first sample."""
    size: int
    """Side of the stored square images."""
    keys: np.ndarray
    """All keys of the dataset (labels.zarr), indexed by global sample index."""
    targets: np.ndarray
    """All targets of the dataset (labels.zarr; -1 unlabelled)."""
    qa: np.ndarray | None = None
    """All QA bitmasks of the dataset (labels.zarr; zeros for a dataset without flags)."""
    keep: np.ndarray | None = None
    """Per labels.zarr row, whether the loader uses the sample; None: every one."""

    @property
    def root(self) -> str:
        """The dataset's location, as it may be logged (credentials redacted)."""
        return self.origin.display

    @property
    def sizes(self) -> list[int]:
        """Samples the loader uses of each shard (all, less any QA exclusions)."""
        if self.keep is None:
            return [s.samples for s in self.shards]
        return [int(self.keep[b : b + s.samples].sum()) for b, s in zip(self.shard_base, self.shards)]

    @property
    def samples(self) -> int:
        return sum(self.sizes)

    @property
    def excluded(self) -> int:
        """Samples of the split left out by ``exclude_qa``."""
        return sum(s.samples for s in self.shards) - self.samples

    @property
    def plan_base(self) -> tuple[int, ...]:
        """Each shard's first index in the numbering of the kept samples (the plan's ids)."""
        if self.keep is None:
            return self.shard_base
        before = np.concatenate([[0], np.cumsum(self.keep, dtype=np.int64)])
        return tuple(int(before[b]) for b in self.shard_base)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """labels.zarr rows of the plan's sample ids (see :attr:`plan_base`)."""
        return ids if self.keep is None else np.flatnonzero(self.keep)[ids]

    def kept_in(self, shard: int) -> np.ndarray | None:
        """Whether each sample of split shard ``shard`` is used, in file order; None: all."""
        if self.keep is None:
            return None
        base = self.shard_base[shard]
        return self.keep[base : base + self.shards[shard].samples]

    def split_targets(self) -> np.ndarray:
        """Targets of the samples of this split the loader uses (from labels.zarr)."""
        parts = [self.targets[b : b + s.samples] for b, s in zip(self.shard_base, self.shards)]
        if self.keep is not None:
            parts = [p[self.kept_in(i)] for i, p in enumerate(parts)]
        return np.concatenate(parts) if parts else np.zeros(0, np.int8)


def read_split(root: Path | str | ShardOrigin, split: str, *, manifest: Manifest | None = None,
               labels: LabelTable | None = None, exclude_qa: int = 0) -> SplitInfo:
    """Read the manifest and labels.zarr of a dataset and describe one split.

    Args:
        root: Dataset folder or URL (``s3://``, ``http(s)://``, ``file://``), or a
            :class:`shards.origin.ShardOrigin` made by :func:`shards.origin.open_origin` (to
            read a remote dataset through a ``--cache-dir``).
        split: ``train`` or ``val``.
        manifest, labels: Already-read copies (read from ``root`` when None).
        exclude_qa: A bitmask of QA flags (:func:`shards.qa.qa_mask`); samples carrying any
            of them leave the split (a dataset without flags keeps every sample).

    Raises:
        shards.store.DatasetNotFoundError: No manifest (a wrong URL, or an unfinished ingest).
        shards.store.RemoteReadError: The server could not be read.
        FormatError: labels.zarr does not have one row per manifest sample.
    """
    origin = root if isinstance(root, ShardOrigin) else open_origin(root)
    manifest = manifest or read_manifest_from(origin.store)
    labels = labels or read_labels_from(origin.store)
    total = sum(s.samples for s in manifest.shards)
    if len(labels) != total:
        raise FormatError(f"{origin.display}: labels.zarr has {len(labels)} rows, the manifest {total} samples")
    base, bases = 0, {}
    for s in manifest.shards:
        bases[s.name] = base
        base += s.samples
    shards = tuple(manifest.shards_of(split))
    qa = np.asarray(labels.qa)
    keep = (qa & exclude_qa) == 0 if exclude_qa else None
    return SplitInfo(
        origin=origin, split=split, shards=shards, shard_base=tuple(bases[s.name] for s in shards),
        size=manifest.size, keys=np.asarray(labels.key), targets=np.asarray(labels.target), qa=qa, keep=keep,
    )


# --------------------------------------------------------------------------- streaming


def _spans_from(spans: Sequence[Span], start: int) -> list[tuple[int, Span]]:
    """(raw position of the span, span) of each span holding raw positions ``>= start``."""
    pos, todo = 0, []
    for span in spans:
        if pos + span.stop - span.start > start:
            todo.append((pos, span))
        pos += span.stop - span.start
    return todo


class _BufferPool:
    """Batch buffers of one shape, each reused once nothing outside the pool refers to it.

    A batch's image tensor is made with :func:`torch.from_numpy` over a pooled array, so the
    tensor, its views and any array made from them keep the array referenced; once the
    consumer has dropped all of them the array's reference count is the pool's own, and the
    next batch is read into it. A fresh buffer costs a page fault per 4 KiB on its first
    write, which made the read into it (the one copy of each image) about three times
    slower than into memory already mapped.
    """

    KEEP = 64
    """Buffers tracked at most (one epoch's pending batches and those the consumer holds)."""

    def __init__(self) -> None:
        self._lent: list[np.ndarray] = []

    def __getstate__(self) -> dict[str, Any]:
        return {"_lent": []}  # a worker process allocates its own (shared) batches

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        for i in range(len(self._lent)):
            # Referenced by the list and getrefcount's argument alone: nobody else holds it.
            if self._lent[i].shape == shape and sys.getrefcount(self._lent[i]) == 2:
                buf = self._lent.pop(i)
                self._lent.append(buf)
                return buf
        buf = np.empty(shape, np.uint8)
        if len(self._lent) >= self.KEEP:
            self._lent.pop(0)  # still in use: left to the garbage collector
        self._lent.append(buf)
        return buf


def _pinned_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor in page-locked memory (CUDA hosts), which a copy to the GPU reads
    asynchronously."""
    return torch.empty(shape, dtype=torch.uint8, pin_memory=True)


class _Batch:
    """One step's item of one worker, filled lane by lane in place: the images are read
    straight into :attr:`images` (see :class:`_LaneFill`)."""

    def __init__(self, rows: int, size: int, *, shared: bool, pin: bool, pool: _BufferPool) -> None:
        if shared:  # the DataLoader then passes it to the main process without another copy
            self.images = torch.empty((rows, size, size), dtype=torch.uint8).share_memory_()
        elif pin:  # torch's pinned allocator reuses freed blocks itself
            self.images = _pinned_empty((rows, size, size))
        else:
            self.images = torch.from_numpy(pool.take((rows, size, size)))
        self.pixels = self.images.numpy()
        self.keys: list[str] = [""] * rows
        self.meta: list[dict[str, Any]] = [{}] * rows


class _LaneFill:
    """Reads one lane's samples from slot ``first_slot`` on into the rows its slots have in
    the worker's batches.

    The lane's raw sequence is read once, in file order; each sample is read straight into
    the batch row of the first slot that wants it (shuffling moves indices, never pixels) and
    checked there before that batch can be handed out (:func:`shards.reader.read_into`). A
    sample that several slots want (the padding that repeats a lane's last samples) is copied
    into the others. Its shards start to be fetched, a few ahead of the reader, when it is
    made, not when it is first read: :class:`LaneDataset` makes all of its lanes before
    reading any, so the first shards of every lane, which the first batch needs, are fetched
    at the same time rather than one lane after another.
    """

    def __init__(self, info: SplitInfo, lane: Lane, first_slot: int, row0: int, chunk: int,
                 first_step: int, batch: Callable[[int], _Batch]) -> None:
        self.info, self.row0, self.chunk, self.first_step = info, row0, chunk, first_step
        self._batch = batch
        wanted = lane.order[first_slot:]
        self.slots: dict[int, list[int]] = {}
        for k, raw in enumerate(wanted.tolist()):
            self.slots.setdefault(raw, []).append(k)
        # The raw position each step needs read before it is complete.
        self.need = (wanted.reshape(-1, chunk).max(1) if len(wanted) else np.zeros(0, np.int64)).tolist()
        start = int(wanted.min()) if len(wanted) else 0
        todo = _spans_from(lane.spans, start) if len(wanted) else []
        self._fetcher = info.origin.prefetcher([info.shards[span.shard] for _, span in todo])
        self._fetcher.start()
        self.done = start - 1
        """The last raw position read (and checked)."""
        self._reader = self._read(todo, start)

    def _where(self, raw: int) -> tuple[np.ndarray, list[str], list[dict[str, Any]], int]:
        k = self.slots[raw][0]
        b = self._batch(self.first_step + k // self.chunk)
        return b.pixels, b.keys, b.meta, self.row0 + k % self.chunk

    def _slot(self, raw: int) -> np.ndarray | None:
        if raw not in self.slots:
            return None
        pixels, _, _, row = self._where(raw)
        return pixels[row]

    def fill(self, step: int) -> None:
        """Read until every slot of ``step`` (counted from the epoch's first step) is filled."""
        need = self.need[step - self.first_step]
        while self.done < need:
            next(self._reader)

    def _read(self, todo: list[tuple[int, Span]], start: int) -> Iterator[None]:
        """Read the raw sequence from ``start`` on, shard by shard, one sample per ``next``."""
        info = self.info
        try:
            for k, (pos, span) in enumerate(todo):
                shard = info.shards[span.shard]
                base = info.shard_base[span.shard]
                first = span.start + max(0, start - pos)
                # The span counts the shard's kept samples (all of them without QA exclusions):
                # ``at[i]`` is the place of file position ``i`` among them, -1 if it is left out.
                kept = info.kept_in(span.shard)
                if kept is None:
                    at, lo, hi = None, first, span.stop
                else:
                    at = np.where(kept, np.cumsum(kept) - 1, -1)
                    files = np.flatnonzero(kept)
                    lo, hi = int(files[first]), int(files[span.stop - 1]) + 1

                def slot(i: int, pos: int = pos, span: Span = span, at: np.ndarray | None = at) -> np.ndarray | None:
                    j = i if at is None else int(at[i])
                    return None if j < 0 else self._slot(pos + j - span.start)

                with self._fetcher.get(k) as where:  # a path, or a cached copy's bytes already checked
                    name = info.origin.store.shard_url(shard.name)
                    try:
                        for s in read_into(where, shard, size=info.size, start=lo, stop=hi, slot=slot, name=name):
                            if info.keys[base + s.index] != s.key:
                                raise FormatError(
                                    f"{name}: sample {s.index} is {s.key!r} but labels.zarr row "
                                    f"{base + s.index} is {info.keys[base + s.index]!r}")
                            j = s.index if at is None else int(at[s.index])
                            if j < 0:
                                continue  # left out by --exclude-qa
                            raw = pos + j - span.start
                            self._place(raw, s.key, s.meta)
                            self.done = raw
                            yield
                    except ShardChecksumError:
                        info.origin.discard(shard)
                        raise
                self.done = pos + span.stop - span.start - 1
        finally:
            self._fetcher.close()

    def _place(self, raw: int, key: str, meta: dict[str, Any]) -> None:
        """Record a sample just read (its pixels are in its first slot) in every slot of it."""
        slots = self.slots.get(raw)
        if not slots:
            return
        pixels, keys, metas, row = self._where(raw)
        keys[row], metas[row] = key, meta
        for k in slots[1:]:
            b = self._batch(self.first_step + k // self.chunk)
            r = self.row0 + k % self.chunk
            b.pixels[r] = pixels[row]
            b.keys[r], b.meta[r] = key, meta

    def finish(self) -> None:
        """Read the lane to its end: a format 1 shard's sha256 is checked after its last byte."""
        for _ in self._reader:
            pass

    def close(self) -> None:
        self._reader.close()
        self._fetcher.close()


def _collate(batch: _Batch, index: np.ndarray, valid: np.ndarray, with_meta: bool) -> dict[str, Any]:
    """One worker's item of one step from its filled batch and the plan's indices."""
    boxes: list[Any] = []
    box_index: list[int] = []
    for i, meta in enumerate(batch.meta):
        b = meta.get("boxes") or []
        boxes.extend(b)
        box_index.extend([i] * len(b))
    out: dict[str, Any] = {
        "images": batch.images,
        "target": torch.tensor([int(m.get("target", -1)) for m in batch.meta], dtype=torch.int64),
        "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        "box_index": torch.tensor(box_index, dtype=torch.int64),
        "index": torch.from_numpy(index.astype(np.int64)),
        "valid": torch.from_numpy(valid.astype(bool)),
        "keys": list(batch.keys),
    }
    if with_meta:
        out["meta"] = [{"patient_id": m.get("patient_id"), "transform": m.get("transform")} for m in batch.meta]
    return out


class LaneDataset(IterableDataset):
    """One rank's share of an epoch, as items of ``(step, worker)``.

    Worker ``w`` of ``K`` owns a contiguous block of the rank's lanes and yields, for each
    step, the chunks of its lanes collated into one item; :class:`ShardLoader` joins the
    ``K`` items of a step (the DataLoader hands them out in worker order) into the batch.
    """

    def __init__(self, info: SplitInfo, plan: EpochPlan, lanes: range, first_step: int,
                 with_meta: bool, pin_memory: bool = False, pool: _BufferPool | None = None) -> None:
        super().__init__()
        self.info, self.plan, self.lanes = info, plan, lanes
        self.first_step, self.with_meta, self.pin_memory = first_step, with_meta, pin_memory
        self.pool = pool or _BufferPool()
        """Batch memory, kept across the epochs of one loader."""

    def worker_lanes(self, worker: int, workers: int) -> range:
        """The block of this rank's lanes that DataLoader worker ``worker`` reads."""
        n = len(self.lanes)
        lo, hi = worker * n // workers, (worker + 1) * n // workers
        return range(self.lanes.start + lo, self.lanes.start + hi)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        winfo = get_worker_info()
        worker, workers = (0, 1) if winfo is None else (winfo.id, winfo.num_workers)
        lanes = self.worker_lanes(worker, workers)
        chunk, first = self.plan.chunk, self.first_step
        rows = len(lanes) * chunk
        pending: dict[int, _Batch] = {}

        def batch(step: int) -> _Batch:
            if step not in pending:
                # Pinned where the batch is made in the main process: a CUDA copy from it
                # is asynchronous, and the DataLoader's pinning then has nothing to copy.
                pending[step] = _Batch(rows, self.info.size, shared=winfo is not None,
                                       pin=self.pin_memory and winfo is None, pool=self.pool)
            return pending[step]

        fills: list[_LaneFill] = []
        try:
            for j, i in enumerate(lanes):  # every lane starts fetching now
                fills.append(_LaneFill(self.info, self.plan.lanes[i], first * chunk, j * chunk, chunk,
                                       first, batch))
            ids = {i: self.info.rows(self.plan.lane_ids(i)).reshape(self.plan.steps, chunk) for i in lanes}
            valid = {i: self.plan.lanes[i].valid.reshape(self.plan.steps, chunk) for i in lanes}
            for step in range(first, self.plan.steps):
                for fill in fills:
                    fill.fill(step)
                item = _collate(batch(step), np.concatenate([ids[i][step] for i in lanes]),
                                np.concatenate([valid[i][step] for i in lanes]), self.with_meta)
                del pending[step]
                item["step"], item["worker"] = step, worker
                yield item
            for fill in fills:  # run each lane to its end: last checksums
                fill.finish()
        finally:
            for fill in fills:
                fill.close()


# --------------------------------------------------------------------------- batches


@dataclasses.dataclass
class HostBatch:
    """One rank's batch as the loader gives it (CPU tensors, images uint8)."""

    step: int
    """Step within the epoch."""
    images: torch.Tensor
    """(n, H, W) uint8."""
    target: torch.Tensor
    """(n,) int64: 1 pneumonia, 0 not, -1 unlabelled."""
    boxes: torch.Tensor
    """(m, 4) float32 xyxy in stored-image pixels."""
    box_index: torch.Tensor
    """(m,) int64: the sample each box belongs to."""
    index: torch.Tensor
    """(n,) int64 global sample index (labels.zarr row)."""
    valid: torch.Tensor
    """(n,) bool: false for padding that must not count (evaluation)."""
    keys: list[str]
    meta: list[dict[str, Any]] | None = None
    """Per sample ``patient_id`` and letterbox ``transform`` (``with_meta`` loaders)."""

    def __len__(self) -> int:
        return len(self.keys)


def _cat(parts: list[torch.Tensor], pin: bool, pool: _BufferPool | None = None) -> torch.Tensor:
    """``torch.cat(parts)``, into page-locked memory when ``pin``, else into a buffer of
    ``pool`` when one is given (uint8 parts).

    A plain ``torch.cat`` of pinned tensors returns pageable memory, from which a
    ``non_blocking`` copy to the GPU is synchronous: the DataLoader's pinning would be lost.
    A fresh pageable buffer of a batch's images costs a page fault per 4 KiB as it is
    written; a pooled one is already mapped.
    """
    if len(parts) == 1 and (not pin or parts[0].is_pinned()):
        return parts[0]
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    if pool is not None and not pin:
        return torch.cat(parts, out=torch.from_numpy(pool.take(shape)))
    return torch.cat(parts, out=torch.empty(shape, dtype=parts[0].dtype, pin_memory=pin))


def _join(items: list[dict[str, Any]], pin: bool = False, pool: _BufferPool | None = None) -> HostBatch:
    """Concatenate the workers' items of one step, in worker (= lane) order (into pinned
    memory when ``pin``; the images into a buffer of ``pool`` otherwise, when given)."""
    offsets = np.cumsum([0] + [len(it["keys"]) for it in items[:-1]])
    meta = None
    if "meta" in items[0]:
        meta = [m for it in items for m in it["meta"]]
    return HostBatch(
        step=int(items[0]["step"]),
        images=_cat([it["images"] for it in items], pin, pool),
        target=_cat([it["target"] for it in items], pin),
        boxes=_cat([it["boxes"] for it in items], pin),
        box_index=_cat([it["box_index"] + int(o) for it, o in zip(items, offsets)], pin),
        index=torch.cat([it["index"] for it in items]),
        valid=_cat([it["valid"] for it in items], pin),
        keys=[k for it in items for k in it["keys"]],
        meta=meta,
    )


class ShardLoader:
    """Batches of one split for one rank, one epoch at a time.

    Args:
        info: From :func:`read_split`.
        rank, world: This process's place in the job.
        global_batch: Samples per step over all ranks (``world`` must divide it).
        lanes: Lanes of the plan (see the module docstring); ``world`` must divide it.
        workers: DataLoader worker processes (at most the rank's lanes are useful).
        seed: Run seed.
        train: Shuffle and count the padding (training) or keep file order and mask the
            padding (evaluation; then ``epoch`` has no effect).
        window: Shuffle window inside a lane.
        with_meta: Add patient ids and letterbox transforms to each batch.
        prefetch: Items each worker prepares ahead.
        pin_memory: Pin host batches (for CUDA).
    """

    def __init__(self, info: SplitInfo, *, rank: int, world: int, global_batch: int, lanes: int,
                 workers: int = 0, seed: int = 0, train: bool = True, window: int = 64,
                 with_meta: bool = False, prefetch: int = 2, pin_memory: bool = False) -> None:
        if global_batch % world:
            raise ValueError(f"the world size {world} does not divide the global batch {global_batch}")
        if lanes % world:
            raise ValueError(f"the world size {world} does not divide the {lanes} lanes")
        self.info, self.rank, self.world = info, rank, world
        self.global_batch, self.num_lanes, self.seed = global_batch, lanes, seed
        self.train, self.window, self.with_meta = train, window, with_meta
        self.prefetch, self.pin_memory = prefetch, pin_memory
        self._pool = _BufferPool()
        per_rank = lanes // world
        self.workers = min(workers, per_rank)
        if workers > per_rank:
            log.info("%d loader workers requested, %d lanes per rank: using %d",
                     workers, per_rank, self.workers)
        self.plan(0)  # validate now, not in a worker

    @property
    def batch_size(self) -> int:
        """Samples per batch on this rank."""
        return self.global_batch // self.world

    def plan(self, epoch: int) -> EpochPlan:
        """The epoch's sample order (pure function of seed and epoch)."""
        return plan_epoch(
            self.info.sizes, global_batch=self.global_batch, lanes=self.num_lanes,
            seed=self.seed, epoch=epoch if self.train else 0, shuffle=self.train,
            window=self.window, pad_valid=self.train, shard_base=self.info.plan_base,
        )

    @property
    def steps(self) -> int:
        """Batches per epoch (the same on every rank)."""
        return math.ceil(self.info.samples / self.global_batch)

    def epoch(self, epoch: int, first_step: int = 0) -> Iterator[HostBatch]:
        """This rank's batches of ``epoch`` from step ``first_step`` on."""
        plan = self.plan(epoch)
        if not 0 <= first_step <= plan.steps:
            raise ValueError(f"first_step={first_step} outside 0..{plan.steps}")
        if first_step == plan.steps:
            return
        dataset = LaneDataset(self.info, plan, plan.rank_lanes(self.rank, self.world),
                              first_step, self.with_meta, self.pin_memory, self._pool)
        loader = DataLoader(
            dataset, batch_size=None, num_workers=self.workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch if self.workers else None,
            multiprocessing_context=worker_context() if self.workers else None,
            worker_init_fn=exit_with_rank if self.workers else None,
        )
        k = max(self.workers, 1)
        items: list[dict[str, Any]] = []
        for item in loader:
            items.append(item)
            if len(items) < k:
                continue
            got = [(int(it["step"]), int(it["worker"])) for it in items]
            step = got[0][0]
            if got != [(step, w) for w in range(k)] or step != first_step:
                raise RuntimeError(f"loader items out of order: expected step {first_step} "
                                   f"from workers 0..{k - 1}, got {got}")
            yield _join(items, self.pin_memory, self._pool)
            items, first_step = [], first_step + 1
        if items or first_step != plan.steps:
            raise RuntimeError(f"loader stopped at step {first_step} of {plan.steps}")


# --------------------------------------------------------------------------- on the device


@dataclasses.dataclass
class DeviceBatch:
    """A batch on the compute device, images float in 0..1 at the training size."""

    images: torch.Tensor
    """(n, 1, s, s) float32."""
    target: torch.Tensor
    """(n,) int64 (-1 unlabelled)."""
    boxes: torch.Tensor
    """(m, 4) float32 xyxy in pixels of the ``s``-pixel frame."""
    box_index: torch.Tensor
    """(m,) int64."""
    valid: torch.Tensor
    """(n,) bool."""
    size: int
    """``s``: the side of ``images``."""

    def boxes_per_image(self) -> list[torch.Tensor]:
        """The boxes of each image, as (k, 4) tensors (one host sync for the counts)."""
        order = torch.argsort(self.box_index, stable=True)
        counts = torch.bincount(self.box_index, minlength=len(self.images)).tolist()
        return list(torch.split(self.boxes[order], counts))


def to_device(batch: HostBatch, device: torch.device, size: int | None = None) -> DeviceBatch:
    """Move a batch to ``device``, make the images float there and resize them.

    Args:
        batch: From :class:`ShardLoader`.
        device: The compute device.
        size: Side to resize to (antialiased bilinear); None keeps the stored size. Boxes
            are scaled with the images.
    """
    nb = device.type == "cuda"
    images = batch.images.to(device, non_blocking=nb).unsqueeze(1).float().div_(255.0)
    boxes = batch.boxes.to(device, non_blocking=nb)
    stored = images.shape[-1]
    if size is not None and size != stored:
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True,
                               align_corners=False)
        boxes = boxes * (size / stored)
    return DeviceBatch(
        images=images, target=batch.target.to(device, non_blocking=nb), boxes=boxes,
        box_index=batch.box_index.to(device, non_blocking=nb),
        valid=batch.valid.to(device, non_blocking=nb), size=images.shape[-1],
    )
