"""Model definitions and the registry that builds them from `config.model`."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision.models.resnet import BasicBlock, Bottleneck

from seg.models.deeplabv3 import DeepLabV3
from seg.models.fcn import FCNResNet, FCNVGG
from seg.models.pspnet import PSPNet
from seg.models.twostream import TwoStreamPSPNet
from seg.models.unet import DoubleConv, UNet

# The units that train.checkpoint_activations recomputes in the backward: each ResNet block
# and each UNet double conv; their outputs are what the following layers need anyway.
CHECKPOINT_BLOCKS = (BasicBlock, Bottleneck, DoubleConv)

_NAMES = ("unet", "pspnet", "deeplabv3", "fcn", "fcn_resnet", "twostream")


def build(model_cfg, num_outputs: int) -> nn.Module:
    """Build the model named by `model_cfg.name`; missing fields take the constructors' defaults."""
    name = model_cfg.get("name")
    if name == "unet":
        return UNet(
            num_outputs,
            base_channels=model_cfg.get("base_channels", 64),
            depth=model_cfg.get("depth", 4),
            bilinear=model_cfg.get("bilinear", False),
            dropout=model_cfg.get("dropout", 0.5),
        )
    if name == "pspnet":
        return PSPNet(
            num_outputs,
            backbone=model_cfg.get("backbone", "resnet50"),
            output_stride=model_cfg.get("output_stride", 8),
            bins=tuple(model_cfg.get("bins", (1, 2, 3, 6))),
            pool=model_cfg.get("pool", "avg"),
            dropout=model_cfg.get("dropout", 0.1),
            aux=model_cfg.get("aux", True),
        )
    if name == "deeplabv3":
        return DeepLabV3(
            num_outputs,
            backbone=model_cfg.get("backbone", "resnet50"),
            output_stride=model_cfg.get("output_stride", 8),
            aux=model_cfg.get("aux", True),
            rates=tuple(model_cfg.get("rates", ())) or None,  # empty: the paper's rates
        )
    if name == "fcn":
        return FCNVGG(
            num_outputs,
            variant=model_cfg.get("variant", "8s"),
            backbone=model_cfg.get("backbone", "vgg16"),
            dropout=model_cfg.get("dropout", 0.5),
            fc_channels=model_cfg.get("fc_channels", 4096),
        )
    if name == "fcn_resnet":
        return FCNResNet(
            num_outputs,
            backbone=model_cfg.get("backbone", "resnet50"),
            output_stride=model_cfg.get("output_stride", 8),
            aux=model_cfg.get("aux", True),
            dropout=model_cfg.get("dropout", 0.1),
        )
    if name == "twostream":
        return TwoStreamPSPNet(
            num_outputs,
            backbone=model_cfg.get("backbone", "resnext50_32x4d"),
            bins=tuple(model_cfg.get("bins", (1, 2, 3, 6))),
            dropout=model_cfg.get("dropout", 0.1),
        )
    raise ValueError(f"model.name={name!r} is not one of {_NAMES}")


def forward_flops(model_cfg, num_outputs: int, size: tuple[int, int]) -> int:
    """FLOPs of one eval-mode forward pass of one image, as torch.utils.flop_counter counts
    them (2 per multiply-accumulate, convolutions and matrix products only), on the meta
    device: no memory, no time."""
    with torch.device("meta"):
        model = build(model_cfg, num_outputs).eval()
        x = torch.empty(1, 3, *size)
    with FlopCounterMode(display=False) as counter:
        model(x)
    return counter.get_total_flops()


def param_count(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["CHECKPOINT_BLOCKS", "DeepLabV3", "FCNResNet", "FCNVGG", "PSPNet", "TwoStreamPSPNet",
           "UNet", "build", "forward_flops", "param_count"]
