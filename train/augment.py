"""Training augmentation in torch ops, on whatever device the batch is on.

Horizontal flip, zoom and shift (one affine warp per image, ``grid_sample``), then
brightness and contrast. Boxes go through exactly the same geometry. Randomness is drawn
apart from applying it (:func:`draw_params`, from an explicit ``torch.Generator`` on the
CPU) and the appliers are pure functions of (tensors, parameters).

The parameters of a step are drawn for the whole *global* batch from a generator seeded
by (seed, epoch, step) (:func:`step_params`), and each rank takes its own slots: a sample
gets the same augmentation whatever the world size, so a run resumed on fewer ranks
continues exactly as the interrupted one would have.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from shards.seeds import augment_seed
from train.config import AugmentConfig

__all__ = [
    "AugmentParams",
    "augment",
    "draw_params",
    "step_params",
    "transform_boxes",
    "transform_images",
]

MIN_BOX_SIDE = 2.0
"""A box narrower or shorter than this (pixels) after the warp and clipping is dropped."""


@dataclasses.dataclass(frozen=True)
class AugmentParams:
    """Per-image augmentation parameters (all tensors of length n)."""

    flip: torch.Tensor
    """(n,) bool: mirror left-right."""
    scale: torch.Tensor
    """(n,) zoom factor (> 1 zooms in)."""
    shift: torch.Tensor
    """(n, 2) shift (x, y) as a fraction of the image side."""
    brightness: torch.Tensor
    """(n,) added to the 0..1 intensities."""
    contrast: torch.Tensor
    """(n,) factor applied around each image's mean."""

    def __len__(self) -> int:
        return len(self.flip)

    def to(self, device: torch.device) -> AugmentParams:
        return AugmentParams(*(getattr(self, f.name).to(device) for f in dataclasses.fields(self)))

    def slice(self, start: int, stop: int) -> AugmentParams:
        """Parameters of images ``start..stop-1``."""
        return AugmentParams(*(getattr(self, f.name)[start:stop] for f in dataclasses.fields(self)))

    @classmethod
    def identity(cls, n: int) -> AugmentParams:
        """Parameters that change nothing."""
        return cls(torch.zeros(n, dtype=torch.bool), torch.ones(n), torch.zeros(n, 2),
                   torch.zeros(n), torch.ones(n))


def _uniform(n: int, half: float, generator: torch.Generator, center: float = 0.0) -> torch.Tensor:
    return center + (torch.rand(n, generator=generator) * 2 - 1) * half


def draw_params(config: AugmentConfig, n: int, generator: torch.Generator) -> AugmentParams:
    """Draw parameters for ``n`` images (always the same number of draws per image)."""
    flip = torch.rand(n, generator=generator) < config.flip
    scale = _uniform(n, config.scale, generator, 1.0)
    shift = torch.stack([_uniform(n, config.translate, generator) for _ in range(2)], dim=1)
    brightness = _uniform(n, config.brightness, generator)
    contrast = _uniform(n, config.contrast, generator, 1.0)
    return AugmentParams(flip, scale, shift, brightness, contrast)


def step_params(config: AugmentConfig, *, seed: int, epoch: int, step: int, global_batch: int,
                rank: int, world: int) -> AugmentParams:
    """This rank's parameters for one step: drawn for the global batch, sliced by rank.

    Args:
        config: Augmentation ranges.
        seed, epoch, step: The position in training (step within the epoch).
        global_batch: Samples of the step over all ranks.
        rank, world: Rank ``r`` gets slots ``[r B/W, (r+1) B/W)`` (as the loader does).
    """
    generator = torch.Generator().manual_seed(augment_seed(seed, epoch, step))
    params = draw_params(config, global_batch, generator)
    per = global_batch // world
    return params.slice(rank * per, (rank + 1) * per)


def _theta(params: AugmentParams) -> torch.Tensor:
    """(n, 2, 3) matrices mapping output to input normalised coordinates.

    Forward (input -> output), in coordinates centred on the image and scaled to [-1, 1]:
    ``u = s * (±x) + 2 * shift``; ``affine_grid`` needs the inverse,
    ``x = ±(u - 2 * shift) / s``.
    """
    n = len(params)
    sign = 1.0 - 2.0 * params.flip.float()
    inv = 1.0 / params.scale
    theta = torch.zeros(n, 2, 3, device=params.scale.device)
    theta[:, 0, 0] = sign * inv
    theta[:, 0, 2] = -sign * inv * 2 * params.shift[:, 0]
    theta[:, 1, 1] = inv
    theta[:, 1, 2] = -inv * 2 * params.shift[:, 1]
    return theta


def transform_images(images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
    """Warp and re-light (n, C, H, W) float images in 0..1 (H = W); zero fill outside."""
    if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
        raise ValueError(f"images must be (n, C, s, s), got {tuple(images.shape)}")
    if len(params) != len(images):
        raise ValueError(f"{len(params)} parameter sets for {len(images)} images")
    p = params.to(images.device)
    grid = F.affine_grid(_theta(p).to(images.dtype), list(images.shape), align_corners=False)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    out = (out - mean) * p.contrast.view(-1, 1, 1, 1) + mean + p.brightness.view(-1, 1, 1, 1)
    return out.clamp_(0.0, 1.0)


def transform_boxes(boxes: torch.Tensor, box_index: torch.Tensor, params: AugmentParams,
                    size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Map (m, 4) xyxy pixel boxes through the images' warp; clip; drop the vanished.

    Args:
        boxes: (m, 4) boxes in pixels of the ``size``-pixel frame.
        box_index: (m,) image of each box.
        params: Parameters of the images.
        size: Side of the images.

    Returns:
        The kept boxes and their image indices.
    """
    if boxes.numel() == 0:
        return boxes.reshape(0, 4), box_index
    p = params.to(boxes.device)
    i = box_index
    half = size / 2.0
    sx, sy = p.shift[i, 0] * size, p.shift[i, 1] * size
    s = p.scale[i]
    flip = p.flip[i]
    x1 = torch.where(flip, size - boxes[:, 2], boxes[:, 0])
    x2 = torch.where(flip, size - boxes[:, 0], boxes[:, 2])
    out = torch.stack(
        [(x1 - half) * s + half + sx, (boxes[:, 1] - half) * s + half + sy,
         (x2 - half) * s + half + sx, (boxes[:, 3] - half) * s + half + sy], dim=1,
    ).clamp(0.0, float(size))
    keep = ((out[:, 2] - out[:, 0]) >= MIN_BOX_SIDE) & ((out[:, 3] - out[:, 1]) >= MIN_BOX_SIDE)
    return out[keep], box_index[keep]


def augment(images: torch.Tensor, boxes: torch.Tensor, box_index: torch.Tensor,
            params: AugmentParams) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`transform_images` and :func:`transform_boxes` together."""
    boxes, box_index = transform_boxes(boxes, box_index, params, images.shape[-1])
    return transform_images(images, params), boxes, box_index
