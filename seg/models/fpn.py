"""Semantic FPN (Kirillov et al. 2019, "Panoptic Feature Pyramid Networks", sec. 3): an FPN on
the encoder and a light head that merges its levels at stride 4.

FPN (Lin et al. 2017): a 1x1 lateral conv per level (c2-c5) to 256 channels, top-down sum with
nearest-neighbour x2 upsampling, a 3x3 conv per level; both with bias, no norm, no activation.
Head: each level P_k (stride 2**k) goes through max(1, k - 2) stages of 3x3 conv (128) -> norm ->
ReLU -> x2 bilinear upsampling (none for P2), which brings it to stride 4; the four are summed,
dropped out (0.1, mmsegmentation's) and a 1x1 conv gives logits, upsampled to the input's size.
The paper's norm is GroupNorm; BatchNorm here, as mmsegmentation's configs and every other head
of seg.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models import backbones
from seg.models.heads import PyramidSegmenter, check_head_args, conv_bn_relu, init_head_

LEVELS = ("c2", "c3", "c4", "c5")


class FPN(nn.Module):
    """forward([c2, ..., c5]) -> [P2, ..., P5], each with `channels` channels.

    Convs are Xavier-uniform with zero bias (mmsegmentation's FPN): with no norm between them,
    He init (fan_out) would grow the maps at every lateral and top-down sum.
    """

    def __init__(self, in_channels: Sequence[int], channels: int = 256):
        super().__init__()
        self.lateral = nn.ModuleList(nn.Conv2d(c, channels, 1) for c in in_channels)
        self.output = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1)
                                    for _ in in_channels)
        for conv in (*self.lateral, *self.output):
            nn.init.xavier_uniform_(conv.weight)
            nn.init.zeros_(conv.bias)

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        maps = [conv(x) for conv, x in zip(self.lateral, features)]
        for i in range(len(maps) - 1, 0, -1):
            # to the lower level's size rather than x2: odd sizes were floored going down
            maps[i - 1] = maps[i - 1] + F.interpolate(maps[i], size=maps[i - 1].shape[-2:],
                                                      mode="nearest")
        return [conv(x) for conv, x in zip(self.output, maps)]


def _scale_head(in_channels: int, channels: int, upsamplings: int) -> nn.Sequential:
    layers = []
    for i in range(max(1, upsamplings)):
        layers += conv_bn_relu(in_channels if i == 0 else channels, channels, 3)
        if upsamplings:
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers)


class SemanticFPNHead(nn.Module):
    """forward({"c2": ..., "c5": ...}) -> logits at c2's resolution."""

    def __init__(self, in_channels: Sequence[int], num_outputs: int, fpn_channels: int = 256,
                 channels: int = 128, dropout: float = 0.1):
        super().__init__()
        self.fpn = FPN(in_channels, fpn_channels)
        self.scale_heads = nn.ModuleList(_scale_head(fpn_channels, channels, k)
                                         for k in range(len(in_channels)))
        self.dropout = nn.Dropout2d(dropout)
        self.logits = nn.Conv2d(channels, num_outputs, 1)
        init_head_(self.scale_heads, self.logits)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        pyramid = self.fpn([features[level] for level in LEVELS])
        out = self.scale_heads[0](pyramid[0])
        for head, x in zip(self.scale_heads[1:], pyramid[1:]):
            # x2 upsamplings of a floored odd size can end a pixel short of P2's size
            out = out + F.interpolate(head(x), size=out.shape[-2:], mode="bilinear",
                                      align_corners=False)
        return self.logits(self.dropout(out))


class SemanticFPN(PyramidSegmenter):
    """Semantic FPN on any encoder of seg.models.backbones (output stride 32, as the paper);
    forward(x) -> {"out"} at the input's size. drop_path: the encoder's stochastic depth."""

    def __init__(self, num_outputs: int, backbone: str = "resnet50", fpn_channels: int = 256,
                 channels: int = 128, dropout: float = 0.1, drop_path: float | None = None):
        check_head_args(num_outputs, dropout)
        levels = {level: level for level in LEVELS}
        net = backbones.encoder(backbone, levels, 32, drop_path)
        widths = backbones.channels(backbone)
        classifier = SemanticFPNHead([widths[level] for level in LEVELS], num_outputs,
                                     fpn_channels, channels, dropout)
        super().__init__(net, classifier, None, backbones.output_norms(backbone, levels))
