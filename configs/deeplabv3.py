"""DeepLabV3 (Chen et al. 2017) on a dilated ResNet, output stride 8, ASPP rates 12-24-36, aux head.

The default backbone is ResNet-18 so that the default run fits the CPU budget (README);
--config.model.backbone=resnet50 gives torchvision's deeplabv3_resnet50. At the default 64x64
images the stride-8 features are 8x8, so rates 12-24-36 reach only padding outside the centre
tap and those branches act as 1x1 convs (the paper's own observation on large rates, and why
it adds image pooling); larger data.image_size gives them their meaning back.
"""
from ml_collections import config_dict

from configs import common, presets


def get_config(arg=None):
    c = common.get_base_config()
    c.model.name = "deeplabv3"
    c.model.backbone = "resnet18"
    c.model.output_stride = 8
    c.model.rates = ()     # empty: the paper's 6-12-18 scaled by 16 / output_stride
    c.model.aux = True
    c.model.drop_path = config_dict.placeholder(float)  # stochastic depth; None: torchvision's
    # The paper has no auxiliary head; 0.5 is what torchvision's reference training uses with it.
    c.loss.aux_weight = 0.5
    # From scratch, as configs/pspnet.py (0.02 / 0.05 / 0.1 gave val mIoU 0.34 / 0.44 / 0.45
    # after 80 steps); the paper's 0.007 assumes an ImageNet-pretrained backbone.
    c.optimizer.lr = 0.05
    return presets.apply(c, arg)
