"""Dilated torchvision ResNets and ResNeXts as feature extractors, and the init used for layers
built on them."""
from __future__ import annotations

from collections.abc import Sequence

import torch.nn as nn
import torchvision
from torchvision.models._utils import IntermediateLayerGetter

# Output channels of (layer3, layer4) per architecture: heads are sized from these.
CHANNELS: dict[str, tuple[int, int]] = {
    "resnet18": (256, 512),
    "resnet34": (256, 512),
    "resnet50": (1024, 2048),
    "resnet101": (1024, 2048),
    # ResNeXt (Xie et al. 2017) is torchvision's ResNet with grouped 3x3 convs: same stages, names
    # and channels, so the dilation rewrite and every head built on CHANNELS apply unchanged.
    "resnext50_32x4d": (1024, 2048),
    "resnext101_32x8d": (1024, 2048),
}

# How many of the last stages trade their stride 2 for dilation.
_DILATED_STAGES = {8: ("layer3", "layer4"), 16: ("layer4",), 32: ()}
_LAYERS = ("layer1", "layer2", "layer3", "layer4")


def resnet(
    name: str = "resnet50",
    output_stride: int = 8,
    return_layers: Sequence[str] = ("layer3", "layer4"),
) -> nn.Module:
    """A randomly initialised ResNet / ResNeXt whose forward returns {layer_name: feature map}.

    Parameter names are torchvision's (`layer1.0.conv1.weight`, ...) so its state_dicts load
    strictly; layers after the last returned one (avgpool, fc) are dropped.
    """
    if name not in CHANNELS:
        raise ValueError(f"backbone name={name!r} is not one of {sorted(CHANNELS)}")
    if output_stride not in _DILATED_STAGES:
        raise ValueError(f"output_stride={output_stride!r} is not one of {sorted(_DILATED_STAGES)}")
    if not return_layers or any(layer not in _LAYERS for layer in return_layers):
        raise ValueError(f"return_layers={tuple(return_layers)!r} must be a non-empty subset of {_LAYERS}")
    net = getattr(torchvision.models, name)(weights=None)
    dilate_(net, output_stride)
    return IntermediateLayerGetter(net, {layer: layer for layer in return_layers})


def dilate_(net: nn.Module, output_stride: int) -> None:
    """Trade the stride of the last stages of a torchvision ResNet for dilation, in place.

    torchvision's `replace_stride_with_dilation` refuses BasicBlock, so this rewrites the built
    network with one rule for both block types: a conv is dilated by the stride accumulated
    *before* it, and a removed stride 2 doubles the dilation of every conv after it. For
    Bottleneck that is exactly torchvision's convention (the first block's strided 3x3 conv keeps
    the previous dilation, later blocks use the new one); in a BasicBlock the first block's
    conv1 keeps the previous dilation and its conv2 already uses the new one.
    """
    dilation = 1
    for stage_name in _DILATED_STAGES[output_stride]:
        for block in getattr(net, stage_name):
            if block.downsample is not None:
                block.downsample[0].stride = (1, 1)
            block.stride = 1  # torchvision keeps this informative attribute; keep it truthful
            # Registration order of torchvision's blocks is their forward order.
            for conv in (m for m in block.children() if isinstance(m, nn.Conv2d)):
                if conv.kernel_size != (1, 1):
                    conv.dilation = (dilation, dilation)
                    conv.padding = (dilation, dilation)
                if conv.stride == (2, 2):
                    conv.stride = (1, 1)
                    dilation *= 2


def init_like_resnet_(module: nn.Module) -> None:
    """torchvision ResNet's init for new layers: He-normal (fan_out, relu) convs, zero biases,
    BatchNorm weight 1 / bias 0. ConvTranspose2d keeps PyTorch's default init."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def init_logits_(conv: nn.Conv2d) -> None:
    """N(0, 0.01) weights and zero bias for a conv that outputs logits (as mmsegmentation's heads):
    He init there gives logits of std ~10 and an initial loss far above log(num_classes)."""
    nn.init.normal_(conv.weight, std=0.01)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
