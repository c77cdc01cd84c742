"""LR-ASPP (Howard et al. 2019, "Searching for MobileNetV3", sec. 6.4): a lite segmentation head
on the stride-8 and the last features of a (dilated) encoder.

Module names and layout are torchvision's `lraspp_mobilenet_v3_large`, so its state_dict loads
strictly (through backbones.from_torchvision_segmentation) and the outputs match
(tests/test_lraspp.py). As torchvision, the attention branch pools globally where the paper pools
49x49 windows with stride (16, 20).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models import backbones
from seg.models.heads import PyramidSegmenter, check_head_args, conv_bn_relu, init_head_


class LRASPPHead(nn.Module):
    """forward({"low": stride-8 map, "high": last map}) -> logits at low's resolution:
    low_classifier(low) + high_classifier(upsampled(cbr(high) * sigmoid(conv(pool(high)))))."""

    def __init__(self, low_channels: int, high_channels: int, num_outputs: int,
                 inter_channels: int = 128):
        super().__init__()
        self.cbr = nn.Sequential(*conv_bn_relu(high_channels, inter_channels, 1))
        self.scale = nn.Sequential(nn.AdaptiveAvgPool2d(1),
                                   nn.Conv2d(high_channels, inter_channels, 1, bias=False),
                                   nn.Sigmoid())
        self.low_classifier = nn.Conv2d(low_channels, num_outputs, 1)
        self.high_classifier = nn.Conv2d(inter_channels, num_outputs, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        low, high = features["low"], features["high"]
        x = self.cbr(high) * self.scale(high)
        x = F.interpolate(x, size=low.shape[-2:], mode="bilinear", align_corners=False)
        return self.low_classifier(low) + self.high_classifier(x)


class LRASPP(PyramidSegmenter):
    """LR-ASPP on any encoder of seg.models.backbones: "low" is the stride-8 level (c3), "high"
    the last (c5) at `output_stride` (16: torchvision's dilated MobileNetV3-Large).
    forward(x) -> {"out"} at the input's size."""

    def __init__(self, num_outputs: int, backbone: str = "mobilenet_v3_large",
                 output_stride: int = 16, inter_channels: int = 128,
                 drop_path: float | None = None):
        check_head_args(num_outputs)
        levels = {"c3": "low", "c5": "high"}
        net = backbones.encoder(backbone, levels, output_stride, drop_path)
        widths = backbones.channels(backbone)
        classifier = LRASPPHead(widths["c3"], widths["c5"], num_outputs, inter_channels)
        init_head_(classifier, classifier.low_classifier, classifier.high_classifier)
        super().__init__(net, classifier, None, backbones.output_norms(backbone, levels))
