"""PSPNet (Zhao et al. 2017): a dilated encoder (ResNet by default) + pyramid pooling module."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models import backbones
from seg.models.heads import FCNHead, Segmenter, check_head_args, conv_bn_relu, init_head_

_POOLS = {"avg": nn.AdaptiveAvgPool2d, "max": nn.AdaptiveMaxPool2d}


class PyramidPooling(nn.Module):
    """Concatenate x with, per bin b, x pooled to b x b -> 1x1 conv -> BN -> ReLU -> upsampled.

    Each branch has branch_channels channels: by default in_channels // len(bins) (PSPNet's);
    UPerNet's pyramid pooling gives every branch the head's width (mmsegmentation's UPerHead).
    Output channels: in_channels + len(bins) * branch_channels.
    """

    def __init__(self, in_channels: int, bins: Sequence[int] = (1, 2, 3, 6), pool: str = "avg",
                 branch_channels: int | None = None):
        super().__init__()
        if pool not in _POOLS:
            raise ValueError(f"pool={pool!r} is not one of {sorted(_POOLS)}")
        if not bins or any(not isinstance(b, int) or b < 1 for b in bins):
            raise ValueError(f"bins={tuple(bins)!r} must be a non-empty sequence of positive ints")
        branch_channels = branch_channels or in_channels // len(bins)
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


class PSPNet(Segmenter):
    """PSPNet on a dilated encoder; forward(x) -> {"out", "aux" (if aux)} at the input's size.

    The head's 3x3 conv has c5_channels // 4 channels: 512 for ResNet-50/101 as in the paper,
    128 for ResNet-18/34. The auxiliary head reads the backbone's aux level (layer3 of a ResNet).
    `dropout` is used by both heads. Any encoder of seg.models.backbones works; the backbone keeps
    torchvision's init, the heads use init_like_resnet_ and init_logits_.
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
        drop_path: float | None = None,
    ):
        check_head_args(num_outputs, dropout)
        aux_level = backbones.aux_level(backbone)
        levels = {"c5": "out", **({aux_level: "aux"} if aux else {})}
        net = backbones.encoder(backbone, levels, output_stride, drop_path)
        channels = backbones.channels(backbone)
        c5 = channels["c5"]
        classifier = PSPHead(c5, c5 // 4, num_outputs, tuple(bins), pool, dropout)
        aux_classifier = (FCNHead(channels[aux_level], num_outputs, dropout, channel_dropout=True)
                          if aux else None)
        for head in (classifier, aux_classifier):
            if head is not None:
                init_head_(head, head[-1])
        super().__init__(net, classifier, aux_classifier,
                         backbones.output_norms(backbone, levels))
