"""UPerNet (Xiao et al. 2018, "Unified Perceptual Parsing"): a pyramid pooling module on the last
stage and an FPN that fuses it with the stride 4, 8 and 16 features.

As mmsegmentation's UPerHead, which the ConvNeXt and Swin papers' segmentation results use:
PPM (bins 1-2-3-6, each branch 1x1 conv to `channels`) on c5, concatenated with c5 and fused by
a 3x3 conv; 1x1 lateral convs on c2-c4; top-down sum with bilinear upsampling; a 3x3 conv on
each summed level; all four upsampled to c2's size, concatenated, fused by a 3x3 conv; dropout
(Dropout2d 0.1) and a 1x1 conv to logits. Every conv but the last is conv -> BN -> ReLU. The
auxiliary FCNHead (256 channels) on c4 is that recipe's (weight 0.4).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models import backbones
from seg.models.heads import (PyramidSegmenter, check_head_args, conv_bn_relu, init_heads_,
                              pyramid_aux_head)
from seg.models.pspnet import PyramidPooling

LEVELS = ("c2", "c3", "c4", "c5")


def _upsample(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """forward({"c2": ..., "c5": ...}) -> logits at c2's resolution."""

    def __init__(self, in_channels: Sequence[int], num_outputs: int, channels: int = 512,
                 bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        *lower, top = in_channels
        self.ppm = PyramidPooling(top, bins, branch_channels=channels)
        self.bottleneck = nn.Sequential(*conv_bn_relu(top + len(bins) * channels, channels, 3))
        self.lateral = nn.ModuleList(nn.Sequential(*conv_bn_relu(c, channels, 1)) for c in lower)
        self.fpn = nn.ModuleList(nn.Sequential(*conv_bn_relu(channels, channels, 3))
                                 for _ in lower)
        self.fuse = nn.Sequential(*conv_bn_relu(len(in_channels) * channels, channels, 3))
        self.dropout = nn.Dropout2d(dropout)
        self.logits = nn.Conv2d(channels, num_outputs, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        *lower, top = (features[level] for level in LEVELS)
        maps = [conv(x) for conv, x in zip(self.lateral, lower)]
        maps.append(self.bottleneck(self.ppm(top)))
        for i in range(len(maps) - 1, 0, -1):  # top-down: each level gets the one above it
            maps[i - 1] = maps[i - 1] + _upsample(maps[i], maps[i - 1])
        maps = [conv(x) for conv, x in zip(self.fpn, maps[:-1])] + [maps[-1]]
        fused = torch.cat([maps[0], *(_upsample(x, maps[0]) for x in maps[1:])], dim=1)
        return self.logits(self.dropout(self.fuse(fused)))


class UPerNet(PyramidSegmenter):
    """UPerNet on any encoder of seg.models.backbones (output stride 32 by default, as the paper
    and mmsegmentation); forward(x) -> {"out", "aux" (if aux)} at the input's size.

    channels: the head's width (512 in the paper and mmsegmentation). drop_path: the encoder's
    stochastic depth (backbones.encoder; mmsegmentation uses 0.4 for ConvNeXt-T, 0.3 for Swin-T).
    """

    def __init__(self, num_outputs: int, backbone: str = "resnet50", output_stride: int = 32,
                 channels: int = 512, bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1,
                 aux: bool = True, drop_path: float | None = None):
        check_head_args(num_outputs, dropout)
        levels = {level: level for level in LEVELS}
        net = backbones.encoder(backbone, levels, output_stride, drop_path)
        widths = backbones.channels(backbone)
        classifier = UPerHead([widths[level] for level in LEVELS], num_outputs, channels,
                              tuple(bins), dropout)
        aux_classifier = pyramid_aux_head(widths, num_outputs, aux)
        init_heads_(classifier, aux_classifier)
        super().__init__(net, classifier, aux_classifier,
                         backbones.output_norms(backbone, levels))
