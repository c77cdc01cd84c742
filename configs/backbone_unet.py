"""UNet's decoder on a torchvision encoder (as segmentation_models.pytorch's Unet): transposed-conv
Up blocks with double convs, skips from every level of the encoder, widths 256-128-64-32-16.

ResNet-34 is that library's usual encoder; any of seg.models.backbones works
(--config.model.backbone=efficientnet_b0, convnext_tiny, ...).
"""
from ml_collections import config_dict

from configs import common, presets


def get_config(arg=None):
    c = common.get_base_config()
    c.model.name = "backbone_unet"
    c.model.backbone = "resnet34"
    c.model.decoder_channels = (256, 128, 64, 32, 16)
    c.model.bilinear = False
    c.model.drop_path = config_dict.placeholder(float)  # stochastic depth; None: torchvision's
    c.optimizer.name = "adam"   # as configs/unet.py
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.0
    return presets.apply(c, arg)
