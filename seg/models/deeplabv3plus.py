"""DeepLabV3+ (Chen et al. 2018, "Encoder-Decoder with Atrous Separable Convolution"): DeepLabV3's
ASPP on the last stage, refined by a decoder that reads the stride-4 features.

Layout as the paper's Fig. 2 and its TensorFlow code: ASPP (1x1, three dilated 3x3, image
pooling; 256 channels, projected and dropped out with p 0.1) on c5; c2 reduced by a 1x1 conv to
48 channels; the ASPP output upsampled bilinearly to c2's size and concatenated; two 3x3 convs of
256; a 1x1 conv to logits, upsampled to the input's size. `separable` uses depthwise separable
convs in the ASPP and the decoder (the paper's final model). The optional auxiliary FCNHead
(256 channels) on c4 is mmsegmentation's recipe (not the paper's).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models import backbones
from seg.models.deeplabv3 import ASPP, paper_rates
from seg.models.heads import (AUX_LEVEL, PyramidSegmenter, check_head_args, conv_bn_relu,
                              init_heads_, pyramid_aux_head, separable_conv_bn_relu)


class DeepLabV3PlusHead(nn.Module):
    """forward({"c2": ..., "c5": ...}) -> logits at c2's resolution."""

    def __init__(self, in_channels: int, low_channels: int, num_outputs: int,
                 rates: Sequence[int], channels: int = 256, low_level_channels: int = 48,
                 separable: bool = True, dropout: float = 0.1):
        super().__init__()
        conv = separable_conv_bn_relu if separable else conv_bn_relu
        self.aspp = ASPP(in_channels, rates, channels, dropout, separable=separable)
        self.low_level = nn.Sequential(*conv_bn_relu(low_channels, low_level_channels, 1))
        self.decoder = nn.Sequential(*conv(channels + low_level_channels, channels, 3),
                                     *conv(channels, channels, 3))
        self.logits = nn.Conv2d(channels, num_outputs, 1)

    def forward(self, features: dict[str, torch.Tensor]) -> torch.Tensor:
        low = self.low_level(features["c2"])
        x = F.interpolate(self.aspp(features["c5"]), size=low.shape[-2:], mode="bilinear",
                          align_corners=False)
        return self.logits(self.decoder(torch.cat([x, low], dim=1)))


class DeepLabV3Plus(PyramidSegmenter):
    """DeepLabV3+ on any encoder of seg.models.backbones; forward(x) -> {"out", "aux" (if aux)}.

    output_stride 16 is the paper's training setting (8 at a higher cost). rates: empty gives
    the paper's 6-12-18 at output stride 16 (12-24-36 at 8). drop_path: the encoder's stochastic
    depth (backbones.encoder).
    """

    def __init__(self, num_outputs: int, backbone: str = "resnet50", output_stride: int = 16,
                 rates: Sequence[int] = (), channels: int = 256, separable: bool = True,
                 dropout: float = 0.1, aux: bool = False, drop_path: float | None = None):
        check_head_args(num_outputs, dropout)
        levels = {level: level for level in ("c2", *((AUX_LEVEL,) if aux else ()), "c5")}
        net = backbones.encoder(backbone, levels, output_stride, drop_path)
        widths = backbones.channels(backbone)
        classifier = DeepLabV3PlusHead(widths["c5"], widths["c2"], num_outputs,
                                       paper_rates(rates, output_stride), channels,
                                       separable=separable, dropout=dropout)
        aux_classifier = pyramid_aux_head(widths, num_outputs, aux)
        init_heads_(classifier, aux_classifier)
        super().__init__(net, classifier, aux_classifier,
                         backbones.output_norms(backbone, levels))

