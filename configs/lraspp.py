"""LR-ASPP (Howard et al. 2019) on MobileNetV3-Large dilated to output stride 16: torchvision's
lraspp_mobilenet_v3_large, whose weights load into it strictly (tests/test_lraspp.py).

torchvision's reference recipe fine-tunes from ImageNet (lr 0.02); from scratch a higher rate
trains faster here, as for the other configs.
"""
from ml_collections import config_dict

from configs import common, presets


def get_config(arg=None):
    c = common.get_base_config()
    c.model.name = "lraspp"
    c.model.backbone = "mobilenet_v3_large"
    c.model.output_stride = 16
    c.model.inter_channels = 128
    c.model.drop_path = config_dict.placeholder(float)  # stochastic depth; None: torchvision's
    c.optimizer.lr = 0.05
    return presets.apply(c, arg)
