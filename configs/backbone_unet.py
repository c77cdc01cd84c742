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
    # From scratch on the embedded data, UNet's Adam 1e-3 left it predicting background after 300
    # steps (val mIoU 0.26); SGD at the other encoder configs' 0.05 reached 0.49 in 150 (512
    # training images).
    c.optimizer.lr = 0.05
    return presets.apply(c, arg)
