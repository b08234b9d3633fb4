"""One rank's batch on the host (:class:`HostBatch`, uint8 images in reused memory) and on
the device (:class:`DeviceBatch`, float images at the training size)."""

from __future__ import annotations

import dataclasses
import sys
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["DeviceBatch", "HostBatch", "to_device"]


class _BufferPool:
    """Batch buffers of one shape, each reused once nothing outside the pool refers to it.

    A batch's image tensor is made with :func:`torch.from_numpy` over a pooled array, so the
    tensor, its views and any array made from them keep the array referenced; once the
    consumer has dropped all of them the array's reference count is the pool's own, and the
    next batch is read into it. A fresh buffer costs a page fault per 4 KiB on its first
    write, which made the read into it (the one copy of each image) about three times
    slower than into memory already mapped. Buffers come from torch's allocator, not numpy's:
    numpy asks the kernel for transparent huge pages for arrays of 4 MiB and more, and a
    huge page the kernel must first compact memory for cost up to 30 ms per 13 MB batch on a
    2-core VM.
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
        buf = torch.empty(shape, dtype=torch.uint8).numpy()  # see the class docstring
        if len(self._lent) >= self.KEEP:
            self._lent.pop(0)  # still in use: left to the garbage collector
        self._lent.append(buf)
        return buf


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


def _cat(parts: list[torch.Tensor], pin: bool, pool: _BufferPool | None = None, lent: bool = False) -> torch.Tensor:
    """The images of the workers' items as one tensor: into page-locked memory when ``pin``,
    else into a buffer of ``pool`` when one is given; a copy even of one part when the
    parts are ``lent`` (memory their maker writes again).

    A plain ``torch.cat`` of pinned tensors returns pageable memory, from which a
    ``non_blocking`` copy to the GPU is synchronous: the DataLoader's pinning would be lost.
    A fresh pageable buffer of a batch's images costs a page fault per 4 KiB as it is
    written; a pooled one is already mapped. numpy copies: ``torch.cat(out=)`` of one
    32 x 640 x 640 uint8 batch took 12-15 ms on a 2-core VM, ``np.concatenate`` 1.
    """
    if len(parts) == 1 and not lent and (not pin or parts[0].is_pinned()):
        return parts[0]
    shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
    if pool is not None and not pin:
        out = torch.from_numpy(pool.take(shape))
    else:
        out = torch.empty(shape, dtype=parts[0].dtype, pin_memory=pin)
    np.concatenate([p.numpy() for p in parts], out=out.numpy())
    return out


def _tensor(parts: list[np.ndarray], pin: bool) -> torch.Tensor:
    """The small arrays of the workers' items (targets, boxes, indices) as one tensor."""
    out = torch.from_numpy(np.concatenate(parts) if len(parts) > 1 else parts[0])
    return out.pin_memory() if pin else out


def _join(items: list[dict[str, Any]], pin: bool = False, pool: _BufferPool | None = None,
          lent: bool = False) -> HostBatch:
    """Concatenate the workers' items of one step, in worker (= lane) order (into pinned
    memory when ``pin``; the images into a buffer of ``pool`` otherwise, when given; copied
    even from one worker when the workers write their images' memory again, ``lent``)."""
    offsets = np.cumsum([0] + [len(it["keys"]) for it in items[:-1]])
    meta = None
    if "meta" in items[0]:
        meta = [m for it in items for m in it["meta"]]
    return HostBatch(
        step=int(items[0]["step"]),
        images=_cat([it["images"] for it in items], pin, pool, lent),
        target=_tensor([it["target"] for it in items], pin),
        boxes=_tensor([it["boxes"] for it in items], pin),
        box_index=_tensor([it["box_index"] + int(o) for it, o in zip(items, offsets)], pin),
        index=_tensor([it["index"] for it in items], False),
        valid=_tensor([it["valid"] for it in items], pin),
        keys=[k for it in items for k in it["keys"]],
        meta=meta,
    )


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
