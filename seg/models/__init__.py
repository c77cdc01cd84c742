"""Model definitions and the registry that builds them from `config.model`."""
from __future__ import annotations

import torch.nn as nn

from seg.models.pspnet import PSPNet
from seg.models.unet import UNet

_NAMES = ("unet", "pspnet")


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
    raise ValueError(f"model.name={name!r} is not one of {_NAMES}")


def param_count(model: nn.Module) -> int:
    """Number of parameters (trainable or not; buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


__all__ = ["PSPNet", "UNet", "build", "param_count"]
