"""UNet (Ronneberger et al. 2015): transposed-conv upsampling, dropout at the bottom."""
from configs import common, presets


def get_config(arg=None):
    c = common.get_base_config()
    c.model.name = "unet"
    c.model.base_channels = 64
    c.model.depth = 4
    c.model.bilinear = False
    c.model.dropout = 0.5
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 0.0
    return presets.apply(c, arg)
