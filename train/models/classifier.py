"""The classifier: :class:`PneumoniaCNN`, a small residual CNN giving one pneumonia logit per
grey-level image, and its shape (:class:`ClassifierConfig`).

It never touches ``torch.distributed``: it exposes its stages (:attr:`PneumoniaCNN.blocks`)
and ``train.distributed`` wraps them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

__all__ = ["ClassifierConfig", "ConvBNAct", "PneumoniaCNN", "ResidualBlock"]


@dataclass(frozen=True, kw_only=True)
class ClassifierConfig:
    """Shape of :class:`PneumoniaCNN`."""

    in_channels: int = 1
    """Input channels (1: the shards hold grey-level images)."""
    width: int = 32
    """Channels of the stem; each stage doubles them, up to ``max_width``."""
    max_width: int = 256
    """Cap on the channels of any stage."""
    depth: int = 4
    """Number of stages; each halves the resolution (total stride ``2 ** (depth + 1)``)."""
    blocks_per_stage: int = 1
    """Residual blocks after each stage's stride-2 convolution (0: none)."""
    dropout: float = 0.2
    """Dropout probability before the final linear layer, in [0, 1)."""
    prior: float | None = None
    """If set, the logit bias starts at ``log(prior / (1 - prior))`` (e.g. the positive
    rate, about 0.22 on RSNA), so early training does not chase the class imbalance."""

    def __post_init__(self) -> None:
        for name in ("in_channels", "width", "max_width", "depth"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_width < self.width:
            raise ValueError(f"max_width must be >= width ({self.width}), got {self.max_width}")
        if not isinstance(self.blocks_per_stage, int) or self.blocks_per_stage < 0:
            raise ValueError(f"blocks_per_stage must be an int >= 0, got {self.blocks_per_stage!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.prior is not None and not 0.0 < self.prior < 1.0:
            raise ValueError(f"prior must be in (0, 1) or None, got {self.prior}")

    def stage_widths(self) -> list[int]:
        """Output channels of each stage."""
        return [min(self.width * 2 ** (i + 1), self.max_width) for i in range(self.depth)]


class ConvBNAct(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> SiLU."""

    def __init__(self, c_in: int, c_out: int, *, kernel: int = 3, stride: int = 1) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, kernel, stride, padding=kernel // 2, bias=False),
            nn.BatchNorm2d(c_out),
            # Not in place: under FSDP2 a BatchNorm can be its own unit, and an in-place op
            # on a unit's output can bypass the hook that all-gathers it for backward.
            nn.SiLU(),
        )


class ResidualBlock(nn.Module):
    """Two 3x3 ConvBNAct with an identity shortcut."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(channels, channels)
        self.conv2 = ConvBNAct(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.conv1(x))


class PneumoniaCNN(nn.Module):
    """Small, fast CNN for pneumonia yes/no on one-channel chest X-rays.

    ``stem`` (stride 2) -> ``blocks`` (one per stage: a stride-2 ConvBNAct then
    ``blocks_per_stage`` residual blocks) -> global average pool -> dropout -> one logit.

    Attributes:
        stem: The first convolution.
        blocks: The stages, in order; the units FSDP2 shards one by one.
        head: Pooling, dropout and the linear layer.
    """

    def __init__(self, config: ClassifierConfig | None = None) -> None:
        super().__init__()
        self.config = config or ClassifierConfig()
        cfg = self.config
        self.stem = ConvBNAct(cfg.in_channels, cfg.width, stride=2)
        stages: list[nn.Module] = []
        c_in = cfg.width
        for c_out in cfg.stage_widths():
            layers: list[nn.Module] = [ConvBNAct(c_in, c_out, stride=2)]
            layers += [ResidualBlock(c_out) for _ in range(cfg.blocks_per_stage)]
            stages.append(nn.Sequential(*layers))
            c_in = c_out
        self.blocks = nn.ModuleList(stages)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(cfg.dropout),
            nn.Linear(c_in, 1),
        )
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            # Zero-init the last BN of each residual branch: blocks start as identities.
            if isinstance(m, ResidualBlock):
                nn.init.zeros_(m.conv2[1].weight)
        linear = self.head[-1]
        nn.init.normal_(linear.weight, std=0.01)
        prior = self.config.prior
        nn.init.constant_(linear.bias, 0.0 if prior is None else float(np.log(prior / (1 - prior))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of pneumonia.

        Args:
            x: (B, in_channels, H, W) float, normalised.

        Returns:
            (B,) logits (apply ``sigmoid`` for probabilities).
        """
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(
                f"expected input (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}"
            )
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        # sum over the single logit rather than squeeze: a view as a module's output makes
        # FSDP2 warn (an in-place op on it would skip its pre-backward hook).
        return self.head(x).sum(dim=1)
