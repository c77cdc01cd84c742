"""FCN-32s (Long et al. 2015): the FCN-8s config (configs/fcn8s.py) with
no skips and x32 final upsampling."""
from configs import fcn8s


def get_config(arg=None):
    c = fcn8s.get_config(arg)
    c.model.variant = "32s"
    c.train.freeze = ("upscore32",)  # the paper keeps the final upsampling bilinear
    return c
