"""PSPNet (Zhao et al. 2017): dilated ResNet + pyramid pooling module."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models.backbones import CHANNELS, resnet
from seg.models.heads import FCNHead, ResNetSegmenter, check_head_args, conv_bn_relu

_POOLS = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}


class PyramidPooling(nn.Module):
    """Concatenate x with, per bin b, x pooled to b x b -> 1x1 conv -> BN -> ReLU -> upsampled.

    Output channels: in_channels + len(bins) * (in_channels // len(bins)).
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6), pool: str = "avg"):
        super().__init__()
        if pool not in _POOLS:
            raise ValueError(f"pool={pool!r} is not one of {sorted(_POOLS)}")
        if not bins or any(not isinstance(b, int) or b < 1 for b in bins):
            raise ValueError(f"bins={tuple(bins)!r} must be a non-empty sequence of positive ints")
        branch_channels = in_channels // len(bins)
        self.branches = nn.ModuleList(
            nn.Sequential(_POOLS[pool](b), *conv_bn_relu(in_channels, branch_channels, 1))
            for b in bins
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(branch(x), size=size, mode="bilinear", align_corners=False)
            for branch in self.branches
        ]
        return torch.cat([x, *pooled], dim=1)


class PSPHead(nn.Sequential):
    """Pyramid pooling -> 3x3 conv -> BN -> ReLU -> Dropout2d -> 1x1 conv to logits."""

    def __init__(self, in_channels: int, head_channels: int, num_outputs: int,
                 bins: Sequence[int], pool: str, dropout: float):
        ppm = PyramidPooling(in_channels, bins, pool)
        ppm_channels = in_channels + len(bins) * (in_channels // len(bins))
        super().__init__(
            ppm,
            *conv_bn_relu(ppm_channels, head_channels, 3),
            nn.Dropout2d(dropout),
            nn.Conv2d(head_channels, num_outputs, 1),
        )


class PSPNet(ResNetSegmenter):
    """PSPNet on a dilated ResNet; forward(x) -> {"out", "aux" (if aux)} at the input's size.

    The head's 3x3 conv has layer4_channels // 4 channels: 512 for ResNet-50/101 as in the
    paper, 128 for ResNet-18/34. The auxiliary head reads layer3. `dropout` is used by both
    heads. Backbone keeps torchvision's init; the heads use init_like_resnet_ and init_logits_.
    """

    def __init__(
        self,
        num_outputs: int,
        backbone: str = "resnet50",
        output_stride: int = 8,
        bins: Sequence[int] = (1, 2, 3, 6),
        pool: str = "avg",
        dropout: float = 0.1,
        aux: bool = True,
    ):
        check_head_args(num_outputs, dropout)
        layers = ("layer3", "layer4") if aux else ("layer4",)
        net = resnet(backbone, output_stride, layers)
        c3, c4 = CHANNELS[backbone]
        super().__init__(
            net, PSPHead(c4, c4 // 4, num_outputs, tuple(bins), pool, dropout),
            FCNHead(c3, num_outputs, dropout, channel_dropout=True) if aux else None)
