"""torchvision's fcn_resnet50: dilated ResNet-50 (output stride 8), FCN head on layer4 and an
auxiliary FCN head on layer3 weighted 0.5 (torchvision's reference training recipe).

--config.model.backbone=resnet18 (or resnet34/101) for a cheaper or deeper encoder.
"""
from ml_collections import config_dict

from configs import common, presets


def get_config(arg=None):
    c = common.get_base_config()
    c.model.name = "fcn_resnet"
    c.model.backbone = "resnet50"
    c.model.output_stride = 8
    c.model.aux = True
    c.model.drop_path = config_dict.placeholder(float)  # stochastic depth; None: torchvision's
    c.model.dropout = 0.1
    c.loss.aux_weight = 0.5
    c.optimizer.lr = 0.05   # from scratch; torchvision's 0.02 fine-tunes an ImageNet backbone
    return presets.apply(c, arg)
