"""A two-stream PSPNet-like net (seg/models/twostream.py) with the recipe of the three-class
Oxford-IIIT Pet notebook it comes from: frozen ResNeXt-50 encoder, cross-entropy ignoring 255,
Adam lr 1e-3 with L2 1e-5, lr x0.85 every 50 steps (a StepLR stepped per iteration).

That recipe's encoder is ImageNet-pretrained; nothing is downloaded here, so the default is
random init, where a frozen encoder only gives random features. For the pretrained setting put
the file in the torch hub cache and add --config.model.backbone_weights=IMAGENET1K_V1 (the error
names the file and where it goes); or train the encoder too with --config.train.freeze="()".
"""
from configs import common, presets


def get_config(arg=None):
    c = common.get_base_config()
    c.model.name = "twostream"
    c.model.backbone = "resnext50_32x4d"
    c.model.bins = (1, 2, 3, 6)
    c.model.dropout = 0.1
    c.loss.name = "cross_entropy"      # ignore_index follows data.ignore_index (255)
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-3
    c.optimizer.weight_decay = 1e-5    # torch.optim.Adam's (coupled L2), as that recipe
    c.schedule.name = "step"
    c.schedule.step_size = 50
    c.schedule.gamma = 0.85
    c.train.freeze = ("backbone",)
    return presets.apply(c, arg)
