"""Layers shared by the segmentation heads."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from seg.models.backbones import init_like_resnet_, init_logits_


def check_head_args(num_outputs: int, dropout: float = 0.0) -> None:
    """The checks every segmentation model makes of its head arguments."""
    if num_outputs < 1:
        raise ValueError(f"num_outputs={num_outputs!r} must be >= 1")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout={dropout!r} must be in [0, 1)")


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


class ResNetSegmenter(nn.Module):
    """A backbone returning {"layer3", "layer4"}, a head on layer4 and an optional auxiliary
    head on layer3, both upsampled bilinearly to the input's size: the shape that torchvision's
    FCN and DeepLabV3 share (its _SimpleSegmentationModel), and PSPNet's.

    The heads get init_like_resnet_ and N(0, 0.01) logits; the backbone keeps its own init.
    forward(x) -> {"out", "aux" (when there is an auxiliary head)}.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Sequential,
                 aux_classifier: nn.Sequential | None):
        super().__init__()
        self.backbone = backbone
        self.classifier = classifier
        # Registered even when None so that the model has no plain attributes.
        self.add_module("aux_classifier", aux_classifier)
        for head in (classifier, aux_classifier):
            if head is not None:
                init_like_resnet_(head)
                init_logits_(head[-1])

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        out = {"out": self.classifier(features["layer4"])}
        if self.aux_classifier is not None:
            out["aux"] = self.aux_classifier(features["layer3"])
        return {k: F.interpolate(v, size=x.shape[-2:], mode="bilinear", align_corners=False)
                for k, v in out.items()}
