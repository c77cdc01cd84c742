"""Layers shared by the segmentation heads."""
from __future__ import annotations

import torch.nn as nn


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int, dilation: int = 1
                 ) -> list[nn.Module]:
    """Bias-free conv ("same" padding) -> BatchNorm -> ReLU, as a list to splice into a Sequential."""
    padding = dilation * (kernel_size // 2)
    return [
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=padding, dilation=dilation,
                  bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]


class FCNHead(nn.Sequential):
    """torchvision's FCNHead layout: 3x3 conv to in/4 -> BN -> ReLU -> dropout -> 1x1 conv.

    torchvision drops single elements (nn.Dropout); channel_dropout=True drops whole feature
    maps (Dropout2d), as PSPNet's reference heads do. Eval outputs are the same either way.
    The caller initialises it (init_like_resnet_ / init_logits_), once, with its other heads.
    """

    def __init__(self, in_channels: int, num_outputs: int, dropout: float = 0.1,
                 channel_dropout: bool = False):
        super().__init__(
            *conv_bn_relu(in_channels, in_channels // 4, 3),
            (nn.Dropout2d if channel_dropout else nn.Dropout)(dropout),
            nn.Conv2d(in_channels // 4, num_outputs, 1),
        )
