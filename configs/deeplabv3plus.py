"""DeepLabV3+ (Chen et al. 2018): ASPP on the last stage, a decoder on the stride-4 features,
separable convs; output stride 16 as the paper trains.

The default backbone is ResNet-18 so that the default run fits the CPU budget (README); the paper
uses Xception / ResNet-101, mmsegmentation ResNet-50/101 at output stride 8 with an auxiliary
head (--config.model.aux=True --config.loss.aux_weight=0.4). Any torchvision encoder of
seg.models.backbones works: --config.model.backbone=mobilenet_v3_large, efficientnet_b0, ...
"""
from ml_collections import config_dict

from configs import common, presets


def get_config(arg=None):
    c = common.get_base_config()
    c.model.name = "deeplabv3plus"
    c.model.backbone = "resnet18"
    c.model.output_stride = 16
    c.model.rates = ()          # empty: the paper's 6-12-18 scaled by 16 / output_stride
    c.model.channels = 256      # ASPP and decoder width (the paper's)
    c.model.separable = True    # depthwise separable convs in the ASPP and the decoder
    c.model.dropout = 0.1       # after the ASPP projection (the paper's code: keep 0.9)
    c.model.aux = False         # FCN head on c4 (mmsegmentation's recipe, not the paper's)
    c.model.drop_path = config_dict.placeholder(float)  # stochastic depth; None: torchvision's
    c.loss.aux_weight = 0.0
    # From scratch, as configs/deeplabv3.py; the paper's 0.007 assumes an ImageNet backbone.
    c.optimizer.lr = 0.05
    return presets.apply(c, arg)
