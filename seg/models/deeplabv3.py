"""DeepLabV3 (Chen et al. 2017, "Rethinking Atrous Convolution"): a dilated encoder + ASPP.

Module names follow torchvision's `deeplabv3_resnet50` and `deeplabv3_mobilenet_v3_large`, so
their state_dicts load strictly and the outputs match (tests/test_deeplabv3.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from seg.models import backbones
from seg.models.heads import (FCNHead, Segmenter, check_head_args, conv_bn_relu, init_head_,
                              separable_conv_bn_relu)

# The paper's atrous rates at output stride 16; they scale with the feature map's resolution
# (doubled at output stride 8) so that each branch sees the same field of view in the image.
_PAPER_RATES, _PAPER_STRIDE = (6, 12, 18), 16


class ImagePooling(nn.Sequential):
    """Global average pool -> 1x1 conv -> BN -> ReLU, broadcast back to the input's size.

    The BN normalises over the batch only (the map is 1x1), so in training mode it needs at
    least two images: PyTorch raises a ValueError for one. torchvision keeps this BN, and so does
    the paper; train batches here are never smaller than train.batch_size (>= 2 in practice).
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(nn.AdaptiveAvgPool2d(1), *conv_bn_relu(in_channels, out_channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x).expand(-1, -1, *x.shape[-2:])


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling: a 1x1 branch, one dilated 3x3 branch per rate and image
    pooling, each conv -> BN -> ReLU; concatenated, projected by 1x1 conv -> BN -> ReLU -> Dropout.
    separable: the dilated branches are depthwise separable convs (DeepLabV3+).
    """

    def __init__(self, in_channels: int, rates: Sequence[int], out_channels: int = 256,
                 dropout: float = 0.5, separable: bool = False):
        super().__init__()
        if not rates or any(not isinstance(r, int) or r < 1 for r in rates):
            raise ValueError(f"rates={tuple(rates)!r} must be a non-empty sequence of positive "
                             "ints")
        self.convs = nn.ModuleList([
            nn.Sequential(*conv_bn_relu(in_channels, out_channels, 1)),
            *(nn.Sequential(*(separable_conv_bn_relu if separable else conv_bn_relu)(
                in_channels, out_channels, 3, r)) for r in rates),
            ImagePooling(in_channels, out_channels),
        ])
        self.project = nn.Sequential(
            *conv_bn_relu((len(rates) + 2) * out_channels, out_channels, 1),
            nn.Dropout(dropout),  # element-wise, as torchvision
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(torch.cat([branch(x) for branch in self.convs], dim=1))


class DeepLabHead(nn.Sequential):
    """ASPP -> 3x3 conv -> BN -> ReLU -> 1x1 conv to logits (torchvision's layout)."""

    def __init__(self, in_channels: int, num_outputs: int, rates: Sequence[int],
                 channels: int = 256):
        super().__init__(
            ASPP(in_channels, rates, channels),
            *conv_bn_relu(channels, channels, 3),
            nn.Conv2d(channels, num_outputs, 1),
        )


def paper_rates(rates: Sequence[int], output_stride: int) -> tuple[int, ...]:
    """`rates`, or when empty the paper's 6-12-18 at output stride 16 scaled to `output_stride`."""
    return tuple(rates) or tuple(r * _PAPER_STRIDE // output_stride for r in _PAPER_RATES)


class DeepLabV3(Segmenter):
    """DeepLabV3 on any encoder of seg.models.backbones; forward(x) -> {"out", "aux" (if aux)}
    at the input's size.

    rates: the ASPP's atrous rates; empty gives the paper's 6-12-18 scaled by 16 / output_stride
    (12-24-36 at output stride 8, torchvision's choice for ResNets; its MobileNetV3 model keeps
    12-24-36 at output stride 16). The auxiliary head (not in the paper; torchvision's FCNHead)
    reads the backbone's aux level: layer3 of a ResNet, the stride-8 block of a MobileNetV3.
    drop_path: stochastic depth of the encoder (backbones.encoder). The backbone keeps
    torchvision's init; the heads use init_like_resnet_ and init_logits_.
    """

    def __init__(self, num_outputs: int, backbone: str = "resnet50", output_stride: int = 8,
                 aux: bool = True, rates: Sequence[int] = (), drop_path: float | None = None):
        check_head_args(num_outputs)
        aux_level = backbones.aux_level(backbone)
        levels = {"c5": "out", **({aux_level: "aux"} if aux else {})}
        net = backbones.encoder(backbone, levels, output_stride, drop_path)
        channels = backbones.channels(backbone)
        classifier = DeepLabHead(channels["c5"], num_outputs, paper_rates(rates, output_stride))
        aux_classifier = FCNHead(channels[aux_level], num_outputs, 0.1) if aux else None
        init_head_(classifier, classifier[-1])
        if aux_classifier is not None:
            init_head_(aux_classifier, aux_classifier[-1])
        super().__init__(net, classifier, aux_classifier,
                         backbones.output_norms(backbone, levels))
