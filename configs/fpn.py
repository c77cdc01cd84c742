"""Semantic FPN (Kirillov et al. 2019): an FPN (256 channels) on the stride 4-32 features and a
head that merges its levels at stride 4 (128 channels).

The default backbone is ResNet-18 so that the default run fits the CPU budget (README); the paper
uses ResNet-50/101: --config.model.backbone=resnet50. Any torchvision encoder of
seg.models.backbones works (convnext_tiny, swin_t, efficientnet_b0, ...).
"""
from ml_collections import config_dict

from configs import common, presets


def get_config(arg=None):
    c = common.get_base_config()
    c.model.name = "fpn"
    c.model.backbone = "resnet18"
    c.model.fpn_channels = 256
    c.model.channels = 128
    c.model.dropout = 0.1
    c.model.drop_path = config_dict.placeholder(float)  # stochastic depth; None: torchvision's
    # mmsegmentation's rate; 0.05 (the other configs' from-scratch rate) diverges here: the FPN
    # has no norm between its convs.
    c.optimizer.lr = 0.01
    return presets.apply(c, arg)
