"""The streaming loader: shards -> per-rank uint8 batches, in an order that is a pure function
of (seed, epoch, step).

The sample order is :func:`train.plan.plan_epoch` (see :mod:`train.plan` for its promises:
equal batches per rank, the repeat bound, resumption at any step).

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

import collections
import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.origin import ShardOrigin, open_origin
from shards.format import FormatError
from shards.labels import LabelTable
from shards.manifest import Manifest, ShardInfo
from shards.reader import ShardChecksumError, read_into
from shards.store import read_labels_from, read_manifest_from
from train.batches import DeviceBatch, HostBatch, _BufferPool, _join, to_device
from train.forking import exit_with_rank, worker_context
from train.lane_threads import InlineLanes, LaneThreads
from train.plan import EpochPlan, Lane, Span, plan_epoch

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

DEFAULT_THREADS = 2
"""Reader threads of a loader without worker processes (:class:`ShardLoader`'s ``threads``)."""


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


def _pinned_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor in page-locked memory (CUDA hosts), which a copy to the GPU reads
    asynchronously."""
    return torch.empty(shape, dtype=torch.uint8, pin_memory=True)


def _shared_empty(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor made straight in shared memory (a worker's batch), as the DataLoader's
    own collate makes its batches: ``torch.empty(shape).share_memory_()`` would first fill
    private memory and then copy it over, which cost as much again per batch."""
    storage = torch.UntypedStorage._new_shared(math.prod(shape))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class _SharedBatches:
    """A DataLoader worker's batch memory: shared-memory buffers, each reused once the main
    process has copied the batch it carried.

    A fresh shared buffer costs twice per batch: the worker faults its pages in as it fills
    them, and the main process maps it anew and faults them in again as it copies it. A
    buffer sent again maps to the storage the main process kept from its last visit (torch
    keeps received storages by inode while they live, and :meth:`ShardLoader.epoch` keeps
    them alive), so a reused buffer costs neither. ``copied[w]`` is the last step whose
    batch the main process has copied out of worker ``w``'s buffers; a buffer lent for a
    later step is never written.
    """

    KEEP = 64
    """Buffers waiting for the main process at most (older ones are left to the collector)."""

    def __init__(self, copied: torch.Tensor, worker: int) -> None:
        self._copied, self._worker = copied, worker
        self._lent: collections.deque[tuple[int, torch.Tensor]] = collections.deque()

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        if self._lent and self._lent[0][0] <= int(self._copied[self._worker]) and self._lent[0][1].shape == shape:
            return self._lent.popleft()[1]
        return _shared_empty(shape)

    def lend(self, step: int, images: torch.Tensor) -> None:
        """``images`` leaves for the main process as step ``step``'s batch."""
        self._lent.append((step, images))
        if len(self._lent) > self.KEEP:
            self._lent.popleft()


class _Batch:
    """One step's item of one worker, filled lane by lane in place: the images are read
    straight into :attr:`images` (see :class:`_LaneFill`)."""

    def __init__(self, rows: int, size: int, *, shared: _SharedBatches | None, pin: bool,
                 pool: _BufferPool) -> None:
        if shared is not None:  # the DataLoader passes it to the main process without another copy
            self.images = shared.take((rows, size, size))
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
    """One worker's item of one step from its filled batch and the plan's indices.

    Only the images are a tensor: a worker sends each tensor through its own shared-memory
    file, which the main process maps and unmaps, where the small arrays travel inside the
    item's pickle (:func:`train.batches._join` makes them tensors)."""
    boxes: list[Any] = []
    box_index: list[int] = []
    for i, meta in enumerate(batch.meta):
        b = meta.get("boxes") or []
        boxes.extend(b)
        box_index.extend([i] * len(b))
    out: dict[str, Any] = {
        "images": batch.images,
        "target": np.array([int(m.get("target", -1)) for m in batch.meta], dtype=np.int64),
        "boxes": np.array(boxes, dtype=np.float32).reshape(-1, 4),
        "box_index": np.array(box_index, dtype=np.int64),
        "index": index.astype(np.int64),
        "valid": valid.astype(bool),
        "keys": list(batch.keys),
    }
    if with_meta:
        out["meta"] = [{"patient_id": m.get("patient_id"), "transform": m.get("transform")} for m in batch.meta]
    return out


def _as_made(item: dict[str, Any]) -> dict[str, Any]:
    """The DataLoader's conversion of each item (``collate_fn`` with ``batch_size=None``):
    none. Its default turns numpy arrays into tensors, which a worker would then send one
    shared-memory file each."""
    return item


class LaneDataset(IterableDataset):
    """One rank's share of an epoch, as items of ``(step, worker)``.

    Worker ``w`` of ``K`` owns a contiguous block of the rank's lanes and yields, for each
    step, the chunks of its lanes collated into one item; :class:`ShardLoader` joins the
    ``K`` items of a step (the DataLoader hands them out in worker order) into the batch.
    """

    def __init__(self, info: SplitInfo, plan: EpochPlan, lanes: range, first_step: int,
                 with_meta: bool, pin_memory: bool = False, pool: _BufferPool | None = None,
                 threads: int = 0, ahead: int = 2, copied: torch.Tensor | None = None) -> None:
        super().__init__()
        self.copied = copied
        """Shared with the workers: the last step the main process copied out of each
        worker's batch memory (:class:`_SharedBatches`); None without workers."""
        self.info, self.plan, self.lanes = info, plan, lanes
        self.first_step, self.with_meta, self.pin_memory = first_step, with_meta, pin_memory
        self.threads, self.ahead = threads, ahead
        """Reader threads of each worker (0: the lanes are read in the consumer's thread)
        and the steps they may run in front of it (:class:`train.lane_threads.LaneThreads`)."""
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
        shared = None
        if winfo is not None:
            assert self.copied is not None, "a LaneDataset read by workers needs `copied`"
            shared = _SharedBatches(self.copied, worker)

        lock = threading.Lock()  # the lanes' reader threads make the batches they fill

        def batch(step: int) -> _Batch:
            with lock:
                if step not in pending:
                    # Pinned where the batch is made in the main process: a CUDA copy from it
                    # is asynchronous, and the DataLoader's pinning then has nothing to copy.
                    pending[step] = _Batch(rows, self.info.size, shared=shared,
                                           pin=self.pin_memory and winfo is None, pool=self.pool)
                return pending[step]

        fills: list[_LaneFill] = []
        runner: LaneThreads | InlineLanes | None = None
        try:
            for j, i in enumerate(lanes):  # every lane starts fetching now
                fills.append(_LaneFill(self.info, self.plan.lanes[i], first * chunk, j * chunk, chunk,
                                       first, batch))
            ids = {i: self.info.rows(self.plan.lane_ids(i)).reshape(self.plan.steps, chunk) for i in lanes}
            valid = {i: self.plan.lanes[i].valid.reshape(self.plan.steps, chunk) for i in lanes}
            if self.threads > 0 and fills:
                runner = LaneThreads(fills, first, self.plan.steps, threads=self.threads, ahead=self.ahead)
            else:
                runner = InlineLanes(fills)
            for step in range(first, self.plan.steps):
                runner.wait(step)
                item = _collate(batch(step), np.concatenate([ids[i][step] for i in lanes]),
                                np.concatenate([valid[i][step] for i in lanes]), self.with_meta)
                with lock:
                    done = pending.pop(step)
                if shared is not None:
                    shared.lend(step, done.images)
                item["step"], item["worker"] = step, worker
                yield item
            runner.wait_finished()  # each lane read to its end: a format 1 shard's last checksum
        finally:
            if runner is not None:
                runner.close()
            for fill in fills:
                fill.close()


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
        prefetch: Items each worker prepares ahead (with reader threads: the steps they may
            read in front of the consumer).
        pin_memory: Pin host batches (for CUDA).
        threads: Reader threads of the process that reads the lanes (see
            :mod:`train.lane_threads`); 0 reads them in the consumer's thread. None: 2
            without worker processes (the reads overlap the consumer's work, and each
            other's), 0 in each worker (the workers read in parallel already).
    """

    def __init__(self, info: SplitInfo, *, rank: int, world: int, global_batch: int, lanes: int,
                 workers: int = 0, seed: int = 0, train: bool = True, window: int = 64,
                 with_meta: bool = False, prefetch: int = 2, pin_memory: bool = False,
                 threads: int | None = None) -> None:
        if global_batch % world:
            raise ValueError(f"the world size {world} does not divide the global batch {global_batch}")
        if lanes % world:
            raise ValueError(f"the world size {world} does not divide the {lanes} lanes")
        self.info, self.rank, self.world = info, rank, world
        self.global_batch, self.num_lanes, self.seed = global_batch, lanes, seed
        self.train, self.window, self.with_meta = train, window, with_meta
        self.prefetch, self.pin_memory = prefetch, pin_memory
        if threads is not None and threads < 0:
            raise ValueError(f"threads={threads}: must be >= 0")
        self._pool = _BufferPool()
        per_rank = lanes // world
        self.workers = min(workers, per_rank)
        if threads is None:
            threads = DEFAULT_THREADS if self.workers == 0 else 0
        self.threads = threads
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
        copied = torch.full((self.workers,), first_step - 1, dtype=torch.int64).share_memory_() \
            if self.workers else None
        dataset = LaneDataset(self.info, plan, plan.rank_lanes(self.rank, self.world),
                              first_step, self.with_meta, self.pin_memory, self._pool,
                              threads=self.threads, ahead=self.prefetch, copied=copied)
        loader = DataLoader(
            dataset, batch_size=None, collate_fn=_as_made, num_workers=self.workers, pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch if self.workers else None,
            multiprocessing_context=worker_context() if self.workers else None,
            worker_init_fn=exit_with_rank if self.workers else None,
        )
        k = max(self.workers, 1)
        items: list[dict[str, Any]] = []
        # The workers' buffers seen this epoch, kept mapped: one sent again is the same storage.
        mapped: collections.deque[Any] = collections.deque(maxlen=k * _SharedBatches.KEEP)
        for item in loader:
            items.append(item)
            if len(items) < k:
                continue
            got = [(int(it["step"]), int(it["worker"])) for it in items]
            step = got[0][0]
            if got != [(step, w) for w in range(k)] or step != first_step:
                raise RuntimeError(f"loader items out of order: expected step {first_step} "
                                   f"from workers 0..{k - 1}, got {got}")
            if copied is None:
                yield _join(items, self.pin_memory, self._pool)
            else:
                batch = _join(items, self.pin_memory, self._pool, lent=True)
                mapped.extend(it["images"].untyped_storage() for it in items)
                copied.fill_(step)  # the workers may write those buffers again
                yield batch
            items, first_step = [], first_step + 1
        if items or first_step != plan.steps:
            raise RuntimeError(f"loader stopped at step {first_step} of {plan.steps}")
