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
    channels: the 3x3 conv's width when not in/4 (mmsegmentation's auxiliary heads use 256).
    The caller initialises it (init_like_resnet_ / init_logits_), once, with its other heads.
    """

    def __init__(self, in_channels: int, num_outputs: int, dropout: float = 0.1,
                 channel_dropout: bool = False, channels: int | None = None):
        channels = channels or in_channels // 4
        super().__init__(
            *conv_bn_relu(in_channels, channels, 3),
            (nn.Dropout2d if channel_dropout else nn.Dropout)(dropout),
            nn.Conv2d(channels, num_outputs, 1),
        )


def separable_conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int,
                           dilation: int = 1) -> list[nn.Module]:
    """Depthwise conv -> BN -> ReLU -> pointwise 1x1 conv -> BN -> ReLU: DeepLabV3+'s separable
    conv (Chen et al. 2018, sec. 3.2; its TensorFlow code and mmsegmentation norm both halves)."""
    padding = dilation * (kernel_size // 2)
    return [
        nn.Conv2d(in_channels, in_channels, kernel_size, padding=padding, dilation=dilation,
                  groups=in_channels, bias=False),
        nn.BatchNorm2d(in_channels),
        nn.ReLU(inplace=True),
        *conv_bn_relu(in_channels, out_channels, 1),
    ]


def init_head_(head: nn.Module, *logits: nn.Conv2d) -> None:
    """init_like_resnet_ for a head's layers, then N(0, 0.01) for the convs that give logits."""
    init_like_resnet_(head)
    for conv in logits:
        init_logits_(conv)


class Segmenter(nn.Module):
    """backbone -> (LayerNorm per map) -> classifier (+ aux_classifier), logits upsampled
    bilinearly to the input's size: torchvision's _SimpleSegmentationModel layout, which its FCN,
    DeepLabV3 and LR-ASPP share and every model here follows.

    backbone: {key: (B, C, H, W)} (seg.models.backbones.encoder). norms: None or a ModuleDict
    of the same keys (backbones.output_norms), applied to the maps first. By default the
    classifier reads "out" and the auxiliary head "aux", as torchvision's; models whose head
    reads several maps override `heads`. Heads are initialised by the model (init_head_).
    forward(x) -> {"out", "aux" (when there is an auxiliary head)}.
    """

    def __init__(self, backbone: nn.Module, classifier: nn.Module,
                 aux_classifier: nn.Module | None = None, norms: nn.ModuleDict | None = None):
        super().__init__()
        self.backbone = backbone
        # Registered even when None so that the model has no plain attributes.
        self.add_module("norms", norms)
        self.classifier = classifier
        self.add_module("aux_classifier", aux_classifier)

    def heads(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"out": self.classifier(features["out"])}
        if self.aux_classifier is not None:
            out["aux"] = self.aux_classifier(features["aux"])
        return out

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.backbone(x)
        if self.norms is not None:
            features = {k: self.norms[k](v) for k, v in features.items()}
        return {k: F.interpolate(v, size=x.shape[-2:], mode="bilinear", align_corners=False)
                for k, v in self.heads(features).items()}


# mmsegmentation's auxiliary head of its multi-level models: an FCNHead of 256 channels on c4
AUX_LEVEL, AUX_CHANNELS = "c4", 256


class PyramidSegmenter(Segmenter):
    """A Segmenter whose classifier reads every map the backbone returns (a dict keyed by level,
    c2 ... c5, or by torchvision's names) and whose auxiliary head reads AUX_LEVEL, where
    mmsegmentation's configs put it (in_index=2) for these multi-level heads."""

    def heads(self, features: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {"out": self.classifier(features)}
        if self.aux_classifier is not None:
            out["aux"] = self.aux_classifier(features[AUX_LEVEL])
        return out


def pyramid_aux_head(widths: dict[str, int], num_outputs: int, aux: bool) -> FCNHead | None:
    """The auxiliary FCN head on AUX_LEVEL, or None without one."""
    return (FCNHead(widths[AUX_LEVEL], num_outputs, 0.1, channel_dropout=True,
                    channels=AUX_CHANNELS) if aux else None)


def init_heads_(classifier: nn.Module, aux_classifier: nn.Module | None) -> None:
    """init_head_ for a classifier with a `logits` conv and an optional FCNHead."""
    init_head_(classifier, classifier.logits)
    if aux_classifier is not None:
        init_head_(aux_classifier, aux_classifier[-1])
