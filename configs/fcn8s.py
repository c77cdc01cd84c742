"""FCN-8s (Long et al. 2015): VGG-16, pool4 and pool3 skips, x8 upsampling.

The paper's network (fc6/fc7 4096 wide, final upsampling fixed to bilinear), from scratch.
Measured (FCN-8s, 150 steps, val mIoU): this config 0.49; fc 1024 wide 0.50, also on
vgg16_bn; fc 1024 at lr 0.01 0.45. So VGG-16 needs no BatchNorm here, and
--config.model.fc_channels=1024 is twice as fast on CPU for the same accuracy.
"""
from configs import common, presets


def get_config(arg=None):
    c = common.get_base_config()
    c.model.name = "fcn"
    c.model.variant = "8s"
    c.model.backbone = "vgg16"      # vgg11/13/16/19, with or without _bn
    c.model.fc_channels = 4096
    c.model.dropout = 0.5
    c.train.freeze = ("upscore8",)  # the paper keeps the final upsampling bilinear
    c.optimizer.lr = 0.05           # from scratch (the paper fine-tunes from ImageNet)
    return presets.apply(c, arg)
