"""PSPNet (Zhao et al. 2017) on a dilated ResNet, output stride 8, bins 1-2-3-6, aux head.

The default backbone is ResNet-18 so that the default run fits the CPU budget (README);
--config.model.backbone=resnet50 gives the paper's network.
"""
from ml_collections import config_dict

from configs import common, presets


def get_config(arg=None):
    c = common.get_base_config()
    c.model.name = "pspnet"
    c.model.backbone = "resnet18"
    c.model.output_stride = 8
    c.model.bins = (1, 2, 3, 6)
    c.model.pool = "avg"
    c.model.dropout = 0.1
    c.model.aux = True
    c.model.drop_path = config_dict.placeholder(float)  # stochastic depth; None: torchvision's
    c.loss.aux_weight = 0.4
    c.optimizer.lr = 0.05   # from scratch; the paper's 0.01 assumes an ImageNet-pretrained backbone
    return presets.apply(c, arg)
