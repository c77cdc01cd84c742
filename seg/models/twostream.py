"""A two-stream PSPNet-like network from a three-class Oxford-IIIT Pet notebook, its bugs fixed.

The encoder (a torchvision ResNeXt-50 by default, not dilated) gives two streams: "main", layer2
at stride 8, and "supp", layer4 at stride 32. The decoder runs pyramid pooling on main and a
supplementary module on supp resized to main's size, concatenates them, and an upsample module
brings the result back to stride 1 for a 1x1 head. Differences from the notebook, on purpose:

- Pyramid pooling concatenates its input once (`PyramidPooling`); the notebook's concatenated it
  twice, so its decoder saw 2048 channels where the design has 512 + 4 * 128 + 512 = 1536. The
  upsample module keeps the notebook's widths relative to its input: in/4, in/8, then main/4.
- Each upsample stage is 3x3 conv -> BN -> ReLU, then x2 bilinear interpolation. The notebook's
  code runs the conv first but interpolates with the default nearest mode (blocky 2x2 logits);
  its docstring asks for bilinear. Conv first keeps the notebook's order and runs each conv at
  the lower resolution (4x fewer multiply-adds than after the upsampling).
- supp is resized to main's size rather than scaled x4: the two differ for sizes that are not
  multiples of 32 (97 -> main 13, supp 4), and the logits are resized to the input's size.
- Interpolation uses align_corners=False, as everywhere in seg; convs followed by BN have no
  bias (BN cancels it).

The notebook freezes the encoder; here that is the config's `train.freeze = ("backbone",)`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models import backbones
from seg.models.backbones import init_like_resnet_, init_logits_
from seg.models.heads import check_head_args, conv_bn_relu
from seg.models.pspnet import PyramidPooling


class SupplementaryModule(nn.Sequential):
    """3x3 conv to in/2 -> BN -> ReLU -> Dropout2d -> 1x1 conv to out -> BN -> ReLU."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float):
        super().__init__(
            *conv_bn_relu(in_channels, in_channels // 2, 3),
            nn.Dropout2d(dropout),
            *conv_bn_relu(in_channels // 2, out_channels, 1),
        )


class UpsampleStage(nn.Sequential):
    """3x3 conv -> BN -> ReLU, then x2 bilinear upsampling."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            *conv_bn_relu(in_channels, out_channels, 3),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
        )


class TwoStreamPSPNet(nn.Module):
    """forward(x) -> {"out": logits at the input's size}.

    Channels for ResNeXt-50: main 512, supp 2048; pyramid pooling 512 + 4 * 128 = 1024; the
    supplementary module 2048 -> 1024 -> 512; upsample 1536 -> 384 -> 192 -> 128; head
    128 -> num_outputs. Other encoders scale with their widths (main = layer2, supp = layer4).
    """

    def __init__(self, num_outputs: int, backbone: str = "resnext50_32x4d",
                 bins: Sequence[int] = (1, 2, 3, 6), dropout: float = 0.1):
        super().__init__()
        check_head_args(num_outputs, dropout)
        bins = tuple(bins)
        # Stride 32 (no dilation): supp is layer4 as torchvision computes it.
        self.backbone = backbones.encoder(backbone, {"c3": "layer2", "c5": "layer4"})
        channels = backbones.channels(backbone)
        main, supp = channels["c3"], channels["c5"]
        self.ppm = PyramidPooling(main, bins)
        self.supplementary = SupplementaryModule(supp, main, dropout)
        cat = main + len(bins) * (main // len(bins)) + main
        self.upsample = nn.Sequential(
            UpsampleStage(cat, cat // 4),
            UpsampleStage(cat // 4, cat // 8),
            UpsampleStage(cat // 8, main // 4),
        )
        self.head = nn.Conv2d(main // 4, num_outputs, 1)
        for decoder in (self.ppm, self.supplementary, self.upsample):
            init_like_resnet_(decoder)
        init_logits_(self.head)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        main = features["layer2"]
        supp = F.interpolate(features["layer4"], size=main.shape[-2:], mode="bilinear",
                             align_corners=False)
        y = torch.cat([self.ppm(main), self.supplementary(supp)], dim=1)
        logits = self.head(self.upsample(y))
        return {"out": F.interpolate(logits, size=x.shape[-2:], mode="bilinear",
                                     align_corners=False)}
