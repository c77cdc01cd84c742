"""UPerNet (Xiao et al. 2018): pyramid pooling on the last stage fused with an FPN over the
stride 4-32 features, with mmsegmentation's auxiliary head on c4 (weight 0.4).

The default backbone is ResNet-18 so that the default run fits the CPU budget (README). The
ConvNeXt and Swin papers' ADE20K setting: --config.model.backbone=convnext_tiny
--config.model.drop_path=0.4 (swin_t: 0.3) with AdamW (lr 1e-4, weight decay 0.01) from
ImageNet weights (--config.model.backbone_weights=IMAGENET1K_V1, read from the torch hub cache).
"""
from ml_collections import config_dict

from configs import common, presets


def get_config(arg=None):
    c = common.get_base_config()
    c.model.name = "upernet"
    c.model.backbone = "resnet18"
    c.model.output_stride = 32  # the paper's and mmsegmentation's: no dilation
    c.model.channels = 512      # head width (the paper's and mmsegmentation's)
    c.model.bins = (1, 2, 3, 6)
    c.model.dropout = 0.1
    c.model.aux = True
    c.model.drop_path = config_dict.placeholder(float)  # stochastic depth; None: torchvision's
    c.loss.aux_weight = 0.4
    c.optimizer.lr = 0.05       # from scratch, as configs/pspnet.py
    return presets.apply(c, arg)
