"""Model definitions and the registry that builds them from `config.model`."""
from __future__ import annotations

import inspect

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from seg.models.backbones import BLOCKS
from seg.models.deeplabv3 import DeepLabV3
from seg.models.deeplabv3plus import DeepLabV3Plus
from seg.models.fcn import FCNResNet, FCNVGG
from seg.models.fpn import SemanticFPN
from seg.models.lraspp import LRASPP
from seg.models.pspnet import PSPNet
from seg.models.twostream import TwoStreamPSPNet
from seg.models.unet import BackboneUNet, DoubleConv, UNet
from seg.models.upernet import UPerNet

# The units that train.checkpoint_activations recomputes in the backward: each block of an
# encoder (ResNet and RegNet bottlenecks, inverted residuals, ConvNeXt and Swin blocks; see
# backbones.FAMILIES) and each UNet double conv; their outputs are what the following layers
# need anyway.
CHECKPOINT_BLOCKS = (*BLOCKS, DoubleConv)

# model.name -> the definition; every other field of config.model is a keyword argument of it
MODELS = {"unet": UNet, "pspnet": PSPNet, "deeplabv3": DeepLabV3, "fcn": FCNVGG,
          "fcn_resnet": FCNResNet, "twostream": TwoStreamPSPNet,
          "deeplabv3plus": DeepLabV3Plus, "upernet": UPerNet, "fpn": SemanticFPN,
          "lraspp": LRASPP, "backbone_unet": BackboneUNet}
# config.model fields that say where the weights come from, not what the model is
INIT_FIELDS = frozenset({"name", "backbone_weights", "init_from"})


def build(model_cfg, num_outputs: int) -> nn.Module:
    """MODELS[model.name](num_outputs, **the other fields of model_cfg): fields the config leaves
    out take the definition's defaults, and a field the definition does not have is an error
    naming it."""
    name = model_cfg.get("name")
    if name not in MODELS:
        raise ValueError(f"model.name={name!r} is not one of {tuple(MODELS)}")
    cls = MODELS[name]
    kwargs = {k: v for k, v in model_cfg.items() if k not in INIT_FIELDS}
    accepted = inspect.signature(cls).parameters
    unknown = sorted(k for k in kwargs if k not in accepted)
    if unknown:
        raise ValueError(f"model.{unknown[0]} is not a field of model.name={name!r} "
                         f"({cls.__name__} takes {', '.join(list(accepted)[1:])})")
    return cls(num_outputs, **kwargs)


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


__all__ = ["CHECKPOINT_BLOCKS", "MODELS", "BackboneUNet", "DeepLabV3", "DeepLabV3Plus",
           "FCNResNet", "FCNVGG", "LRASPP", "PSPNet", "SemanticFPN", "TwoStreamPSPNet", "UNet",
           "UPerNet", "build", "forward_flops", "param_count"]
